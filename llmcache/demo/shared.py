"""Part 4, two processes sharing one cache: a local redis-server, and two replicas of an embedding
service (MiniLM through sentence-transformers, `accelerate(model, shared=url)`), run one after the
other on the same Zipf stream of queries, in another order (a second replica behind a load
balancer, or the first one restarted). The second process starts with an empty device bank and
serves from Redis what the first computed. Each replica is a fresh Python process
(`python -m llmcache.demo.shared URL STREAM OUT DEVICE THREADS`): it times its stream, flushes its
writes and reports its stats; its embeddings are checked against this process's uncached model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .common import Skipped, progress, timed
from .texts import zipf_stream

REQUEST = 32


def _replica(url: str, stream_path: str, out_path: str, device: str, threads: str) -> None:
    """One replica: its stream through the accelerated model; stats and embeddings to `out_path`."""
    import llmcache
    from llmcache.models import load_sentence_minilm

    torch.set_num_threads(int(threads))
    model = llmcache.accelerate(load_sentence_minilm(device), shared=url)
    texts = json.loads(Path(stream_path).read_text())
    seconds, rows = [], []
    with torch.inference_mode(), timed(device, seconds):
        for start in range(0, len(texts), REQUEST):
            rows.append(model.encode(texts[start : start + REQUEST], convert_to_tensor=True,
                                     show_progress_bar=False).float().cpu())
    flushed = llmcache.flush(model, timeout=60)
    s = llmcache.stats(model)
    torch.save(torch.cat(rows), out_path + ".pt")
    Path(out_path).write_text(json.dumps({
        "seconds": seconds[0], "rows": len(texts), "local_hits": s.hits - s.shared.hits, "repeats": s.repeats,
        "from_redis": s.shared.hits, "computed": len(texts) - s.hits - s.repeats, "flushed": flushed,
        "shared": asdict(s.shared)}))


def available() -> None:
    """Raises Skipped naming the install command when redis-server or redis-py is missing."""
    from llmcache.shared.server import INSTALL

    if shutil.which("redis-server") is None or importlib.util.find_spec("redis") is None:
        raise Skipped(f"needs redis-server on PATH and the redis package: {INSTALL}")


def run(model, sentences: list[str], rows: int, device: str, seed: int = 0) -> dict:
    """Replicas A then B on one fresh redis-server; `model` (a SentenceTransformer, not
    accelerated) gives the uncached embeddings the replicas' are checked against."""
    available()
    from llmcache.shared.server import redis_server

    work = Path(tempfile.mkdtemp(prefix="llmcache-demo-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    replicas = []
    try:
        with redis_server() as server:
            first = zipf_stream(sentences, rows, seed=seed + 10)
            for n, name in enumerate(progress(("A", "B"), "4 shared cache")):
                stream = first if n == 0 else random.Random(seed + 11).sample(first, len(first))
                (work / f"{name}.json").write_text(json.dumps(stream))
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "llmcache.demo.shared", server.url,
                                       str(work / f"{name}.json"), str(work / name), device, str(torch.get_num_threads())],
                                      env=env, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise RuntimeError(f"replica {name} failed:\n{done.stderr[-2000:]}")
                report = json.loads((work / name).read_text())
                with torch.inference_mode():
                    truth = model.encode(stream, batch_size=REQUEST, convert_to_tensor=True,
                                         show_progress_bar=False).float().cpu()
                got = torch.load(work / f"{name}.pt")
                cosine = torch.nn.functional.cosine_similarity(got.double(), truth.double(), dim=1)
                replicas.append({"name": name, **report, "process_s": time.perf_counter() - start,
                                 "distinct": len(set(stream)), "max_abs_diff": float((got - truth).abs().max()),
                                 "min_cosine": float(cosine.min())})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, b = replicas
    return {"part": "shared", "rows": rows, "replicas": replicas, "speedup": a["seconds"] / b["seconds"],
            "from_redis_share": b["from_redis"] / rows}


if __name__ == "__main__":
    _replica(*sys.argv[1:6])
