"""``drmerge dev up --demo``: a DRM merge through the running dev stack, end to end.

It builds small random Llama checkpoints (a base and three fine-tunes with low-rank
deltas), uploads them to the stack's S3, submits a DRM merge through the HTTP API with
the typed client, follows it to the end and loads the result with transformers: the
proof that the output is a usable model, not just files.
"""

from __future__ import annotations

import json
import os
import sys
import time

DEMO_BUCKET = "drmerge-demo"


def build_demo_checkpoints(root: str, n_finetunes: int = 3, seed: int = 0) -> dict[str, str]:
    """A tiny random Llama base and ``n_finetunes`` fine-tunes whose deltas are low rank
    (as real fine-tunes mostly are), saved as HF checkpoints. Returns name -> folder.
    Uses transformers when installed (so the result can be loaded back); otherwise writes
    the same Llama layout with safetensors alone."""
    import torch

    torch.manual_seed(seed)
    dims = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=False)
    out = {"base": os.path.join(root, "base")}
    try:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        model = LlamaForCausalLM(LlamaConfig(**dims)).eval()

        def save(state: dict, folder: str) -> None:
            model.load_state_dict(state)
            model.save_pretrained(folder)

        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    except ImportError:
        from safetensors.torch import save_file

        base_state = _plain_llama_state(dims)

        def save(state: dict, folder: str) -> None:
            os.makedirs(folder, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"),
                      metadata={"format": "pt"})
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32",
                           **dims}, f, indent=2)

    save(base_state, out["base"])
    for t in range(n_finetunes):
        g = torch.Generator().manual_seed(seed + 100 + t)
        state = {}
        for name, w in base_state.items():
            if w.ndim == 2:
                rank = 4
                a = torch.randn(w.shape[0], rank, generator=g) / rank ** 0.5
                b = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
                state[name] = w + 0.05 * (a @ b)
            else:
                state[name] = w + 0.01 * torch.randn(w.shape, generator=g)
        out[f"ft-{t + 1}"] = os.path.join(root, f"ft-{t + 1}")
        save(state, out[f"ft-{t + 1}"])
    return out


def _plain_llama_state(d: dict) -> dict:
    import torch

    h, i, v = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    kv = h // d["num_attention_heads"] * d["num_key_value_heads"]
    state = {"model.embed_tokens.weight": torch.randn(v, h) * 0.02, "model.norm.weight": torch.ones(h),
             "lm_head.weight": torch.randn(v, h) * 0.02}
    for layer in range(d["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))):
            state[p + name + ".weight"] = torch.randn(*shape) * 0.02
        state[p + "input_layernorm.weight"] = torch.ones(h)
        state[p + "post_attention_layernorm.weight"] = torch.ones(h)
    return state


def _s3_client(state: dict):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=state["s3_endpoint_url"], region_name=state["s3_region"],
        aws_access_key_id=state["aws_access_key_id"], aws_secret_access_key=state["aws_secret_access_key"],
        config=Config(s3={"addressing_style": "path"}))


def run_demo(state: dict, out=sys.stdout) -> int:
    from drmerge_client import ApiError, Client
    from service.jobs.status import JobStatus

    from .client_commands import JobProgress, describe

    state_dir = os.path.dirname(state["processes"]["api"]["log"]).rsplit(os.sep, 1)[0]
    demo_dir = os.path.join(state_dir, "demo")
    s3 = _s3_client(state)
    try:
        s3.head_bucket(Bucket=DEMO_BUCKET)
    except Exception:
        s3.create_bucket(Bucket=DEMO_BUCKET)
    listed = s3.list_objects_v2(Bucket=DEMO_BUCKET, Prefix="base/")
    if not listed.get("KeyCount"):
        print("building demo checkpoints (a tiny random Llama and 3 low-rank fine-tunes) ...", file=out, flush=True)
        folders = build_demo_checkpoints(os.path.join(demo_dir, "checkpoints"))
        for name, folder in folders.items():
            for fname in sorted(os.listdir(folder)):
                s3.upload_file(os.path.join(folder, fname), DEMO_BUCKET, f"{name}/{fname}")
        print(f"uploaded them to s3://{DEMO_BUCKET}/", file=out)
    run = time.strftime("%Y%m%d-%H%M%S")
    spec = {
        "base_model": f"s3://{DEMO_BUCKET}/base/",
        "models": [{"model": f"s3://{DEMO_BUCKET}/ft-{i}/"} for i in (1, 2, 3)],
        "method": "drm",
        "parameters": {"direction": "vertical", "drop_rate": 0.8, "rank_threshold": 0.01},
        "output": f"s3://{DEMO_BUCKET}/merged/{run}/",
    }
    request = {"spec": spec, "metadata": {"source": "drmerge dev up --demo"}}
    os.makedirs(demo_dir, exist_ok=True)
    request_path = os.path.join(demo_dir, "request.json")
    with open(request_path, "w") as f:
        json.dump(request, f, indent=2)
    api = state["api_url"]
    view = JobProgress(stream=sys.stderr)
    try:
        with Client(api, api_key=state.get("api_key")) as c:
            job = c.create(spec, metadata=request["metadata"])
            print(f"submitted merge {job.id} (POST {api}/v1/merges)", file=out, flush=True)
            job = c.wait(job.id, poll_s=0.2, on_progress=view.on_progress, on_event=view.on_event)
    except ApiError as e:
        print(f"error: {e.code}: {e.detail}", file=sys.stderr)
        return 3
    finally:
        view.bar.close()
    print(describe(job), file=out)
    if job.status != JobStatus.SUCCEEDED:
        e = job.error
        print(f"error: {e.code if e else 'cancelled'}: {e.message if e else 'the merge was cancelled'}",
              file=sys.stderr)
        return 1
    _check_with_transformers(s3, job, os.path.join(demo_dir, "merged"), out)
    jid = job.id
    print(f"""
The merged model is at {job.result.output}
(S3 endpoint {state['s3_endpoint_url']}, credentials in {os.path.relpath(os.path.join(state_dir, 'env'))}).

Try the API (source {os.path.relpath(os.path.join(state_dir, 'env'))} first: it sets DRMERGE_API_KEY):
  curl -s -H "Authorization: Bearer $DRMERGE_API_KEY" {api}/v1/merges/{jid}
  curl -s -H "Authorization: Bearer $DRMERGE_API_KEY" {api}/v1/merges/{jid}/events
  curl -s -H "Authorization: Bearer $DRMERGE_API_KEY" '{api}/v1/merges?status=succeeded&limit=5'
  curl -s {api}/metrics | grep ^drmerge_
  # a new merge (change "output" in the file first, or add "overwrite": true to the spec):
  curl -s -X POST {api}/v1/merges -H "Authorization: Bearer $DRMERGE_API_KEY" -H 'content-type: application/json' \\
       -H "Idempotency-Key: $(uuidgen 2>/dev/null || date +%s%N)" -d @{os.path.relpath(request_path)}
Or the CLI (source {os.path.relpath(os.path.join(state_dir, 'env'))} first, or run from this directory):
  drmerge jobs
  drmerge status {jid}
  drmerge wait {jid}
API docs: {api}/docs   Stop everything: drmerge dev down""", file=out)
    return 0


def _check_with_transformers(s3, job, local_dir: str, out) -> None:
    """Download the merged checkpoint and load it with transformers: the proof that the
    output is a usable model, not just files."""
    output = job.result.output
    bucket, _, prefix = output[len("s3://"):].partition("/")
    os.makedirs(local_dir, exist_ok=True)
    for f in job.result.files:
        s3.download_file(bucket, prefix + f.name, os.path.join(local_dir, f.name))
    try:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

        model = AutoModelForCausalLM.from_pretrained(local_dir)
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        print(f"loaded {os.path.relpath(local_dir)} with transformers.AutoModelForCausalLM: "
              f"{sum(p.numel() for p in model.parameters()):,} parameters, logits {tuple(logits.shape)}", file=out)
    except ImportError:
        print(f"downloaded the merged checkpoint to {os.path.relpath(local_dir)} "
              "(pip install transformers to load it)", file=out)
    except Exception as e:  # the merge itself succeeded; say what did not work
        print(f"warning: the merged checkpoint did not load with transformers: {e}", file=out)
