# presets/llama2-7b-tldr.sh: the paper's settings for Llama-2-7B on TL;DR summarisation, one node of
# 8 x A100-80G (PRESET=llama2-7b-tldr bash iterate.sh). Sourced by iterate.sh; every variable can
# still be set from the environment (it wins over the preset). The shared settings are in
# llama2-7b.inc. Needs the hub (or local copies given by path): set HF_HUB_OFFLINE=0 once to download.
SFT_DATA=${SFT_DATA:-CarperAI/openai_summarize_tldr}   # {prompt, label}: post and reference summary
PAIRS=${PAIRS:-openai/summarize_from_feedback#comparisons}
EVAL_PAIRS=${EVAL_PAIRS:-openai/summarize_from_feedback#comparisons:validation}
PROMPTS=${PROMPTS:-CarperAI/openai_summarize_tldr}     # the post, ending in "TL;DR:"
TEST_PROMPTS=${TEST_PROMPTS:-CarperAI/openai_summarize_tldr:test}
ROUNDS=${ROUNDS:-4}                                    # the paper's summarisation gains peak at round 4
RESPONSE_TOKENS=64
source presets/llama2-7b.inc
