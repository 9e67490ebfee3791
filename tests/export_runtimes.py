"""Run our exported files with llama.cpp (llama-cpp-python) or transformers; print one JSON line.

Called by the slow tests in test_export.py, possibly with another interpreter (one that has
those libraries), so it imports nothing from dsjax:

    python tests/export_runtimes.py llama MODEL.gguf PROMPTS_JSON N
    python tests/export_runtimes.py llama_logits MODEL.gguf IDS_JSON LOGITS_OUT.npy
    python tests/export_runtimes.py hf HF_DIR IDS.npy LOGITS_OUT.npy PROMPT_IDS_JSON N
    python tests/export_runtimes.py hf_tokenize HF_DIR TEXTS_JSON
"""

import json
import sys


def llama(model_path: str, prompts_json: str, n: str) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model_path, n_ctx=256, n_threads=2, seed=0, verbose=False)
    eos = llm.token_eos()
    prompt_ids, tokens, texts = [], [], []
    for prompt in json.loads(prompts_json):
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
        out = []
        # temperature 0 is llama.cpp's greedy sampler; no repetition penalty
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if token == eos or len(out) == int(n):
                break
            out.append(int(token))
        prompt_ids.append(ids)
        tokens.append(out)
        texts.append(llm.detokenize(out).decode("utf-8", errors="replace"))
    return {"version": llama_cpp.__version__, "prompt_ids": prompt_ids, "tokens": tokens, "texts": texts}


def llama_logits(model_path: str, ids_json: str, logits_out: str) -> dict:
    """Logits of every position of one token sequence, with an f32 KV cache (llama.cpp's default is f16)."""
    import llama_cpp
    import numpy as np

    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=256, n_threads=2, logits_all=True, type_k=f32, type_v=f32,
                          flash_attn=False, verbose=False)
    ids = json.loads(ids_json)
    llm.eval(ids)
    np.save(logits_out, np.asarray(llm.scores[: len(ids)], np.float32))
    return {"version": llama_cpp.__version__}


def hf(folder: str, ids_path: str, logits_out: str, prompts_json: str, n: str) -> dict:
    import numpy as np
    import torch
    import transformers
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.load(ids_path))).logits
        np.save(logits_out, logits.numpy())
        greedy = []
        for prompt in json.loads(prompts_json):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=int(n), do_sample=False)[0, len(prompt):].tolist()
            eos = model.generation_config.eos_token_id
            greedy.append(out[: out.index(eos)] if eos in out else out)
    return {"torch": torch.__version__, "transformers": transformers.__version__, "greedy": greedy}


def hf_tokenize(folder: str, texts_json: str) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer(text).input_ids for text in json.loads(texts_json)]
    return {"class": type(tokenizer).__name__, "ids": ids, "decoded": [tokenizer.decode(i[1:]) for i in ids]}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    print(json.dumps({"llama": llama, "llama_logits": llama_logits, "hf": hf, "hf_tokenize": hf_tokenize}[command](*args)))
