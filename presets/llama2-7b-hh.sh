# presets/llama2-7b-hh.sh: the paper's settings for Llama-2-7B on Anthropic HH-RLHF, one node of
# 8 x A100-80G (PRESET=llama2-7b-hh bash iterate.sh). Sourced by iterate.sh; every variable can
# still be set from the environment (it wins over the preset). The shared settings are in
# llama2-7b.inc. Needs the hub (or local copies given by path): set HF_HUB_OFFLINE=0 once to download.
SFT_DATA=${SFT_DATA:-Anthropic/hh-rlhf}                # SFT on the chosen transcripts
PAIRS=${PAIRS:-Anthropic/hh-rlhf}
EVAL_PAIRS=${EVAL_PAIRS:-Anthropic/hh-rlhf:test}
PROMPTS=${PROMPTS:-Anthropic/hh-rlhf}                  # the prompt: the shared prefix of a pair
TEST_PROMPTS=${TEST_PROMPTS:-Anthropic/hh-rlhf:test}
ROUNDS=${ROUNDS:-4}                                    # the paper's dialogue gains peak at round 3
RESPONSE_TOKENS=256
source presets/llama2-7b.inc
