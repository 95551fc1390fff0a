"""`ternary-mamba bench serve`: a load test of `serve` on loopback with the official `openai` client.

The server runs in this process (uvicorn in a thread, the batching decode worker in another); for each load level
N clients (threads) each send `--requests` streamed completions one after the other.  Reported per level:
completion tokens per second over the level's wall time, request latency percentiles, time to the first token,
and how many requests one decode step advanced on average (the batching).  The reference, measured in the same
run, is the single-client level: "x 1 client" is the throughput ratio to it."""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from ..errors import UserError
from ..log import say
from ..ops.device import cpu_description


def _packed_bundled(folder: Path) -> Path:
    """The bundled teacher, absmean PTQ, packed as tq2: a small ternary model to serve."""
    from ..assets import TEACHER
    from ..formats.packed import export_packed
    from ..quant.qat import TernaryConfig, quantize_
    from ..runtime.load import load_model
    m = quantize_(load_model(TEACHER), TernaryConfig())
    out = folder / "bundled-tq2"
    export_packed(m, out, "tq2", "fp16", TEACHER / "tokenizer.json", source="bundled teacher, absmean PTQ")
    return out


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _level(client, name: str, n: int, requests: int, max_tokens: int, engine) -> dict:
    lat, ttft, toks, errors = [], [], [], []

    def one_client(i: int) -> None:
        for j in range(requests):
            t0 = time.perf_counter()
            first, count = None, 0
            try:
                stream = client.completions.create(model=name, prompt=f"Chapter {i * requests + j + 1}.",
                                                   max_tokens=max_tokens, temperature=1.0, seed=i * 1000 + j,
                                                   stream=True)
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        first = first or time.perf_counter()
                        count += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")
                continue
            lat.append(time.perf_counter() - t0)
            ttft.append((first or time.perf_counter()) - t0)
            toks.append(count)
    steps0, rows0 = engine.gen.steps, engine.gen.rows
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise UserError(f"bench serve: {len(errors)} requests failed at {n} clients (first: {errors[0][:160]})")
    tokens = (engine.gen.rows - rows0) + len(lat)     # decode-step rows + each prompt's first token (prefill)
    steps = max(engine.gen.steps - steps0, 1)
    return {"clients": n, "requests": len(lat), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "latency_p50_s": _percentile(lat, 0.5), "latency_p90_s": _percentile(lat, 0.9),
            "latency_p99_s": _percentile(lat, 0.99), "ttft_p50_s": _percentile(ttft, 0.5),
            "ttft_p90_s": _percentile(ttft, 0.9), "rows_per_step": (engine.gen.rows - rows0) / steps,
            "text_chunks": sum(toks)}


def run_bench_serve(cfg) -> dict:
    try:
        import openai
    except ImportError:
        raise UserError("bench serve needs the openai client: pip install openai (and 'ternary-mamba[serve]')") \
            from None
    from ..commands.serve import Server
    from ..commands.tool_configs import ServeConfig
    from ..ops.build import set_threads
    set_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = cfg.model or str(_packed_bundled(Path(tmp)))
        label = cfg.model or "bundled teacher (absmean PTQ, packed tq2)"
        server = Server(ServeConfig(model=model, port=0, max_batch=max(cfg.clients), max_queue=4 * max(cfg.clients),
                                    max_tokens_limit=max(cfg.max_tokens, 8))).start_in_thread()
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
            _level(client, server.engine.name, 1, 1, 8, server.engine)          # warm-up: kernels built, caches
            rows = [_level(client, server.engine.name, n, cfg.requests, cfg.max_tokens, server.engine)
                    for n in cfg.clients]
        finally:
            server.stop()
    base = next((r["tok_s"] for r in rows if r["clients"] == 1), rows[0]["tok_s"])
    env = {"cpu": cpu_description(), "threads": cfg.threads, "model": label, "max_tokens": cfg.max_tokens,
           "requests_per_client": cfg.requests, "max_batch": max(cfg.clients)}
    lines = [f"bench serve: {label}; {env['cpu']}; {cfg.threads} threads; {cfg.requests} streamed requests per "
             f"client, {cfg.max_tokens} tokens each; server and clients in one process (loopback)", "",
             "| clients | tok/s | x 1 client | requests per step | latency p50 / p90 / p99 (s) | first token p50 / p90 (s) |",
             "|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['tok_s']:,.1f} | {r['tok_s'] / base:.2f} | {r['rows_per_step']:.1f} | "
                     f"{r['latency_p50_s']:.2f} / {r['latency_p90_s']:.2f} / {r['latency_p99_s']:.2f} | "
                     f"{r['ttft_p50_s']:.2f} / {r['ttft_p90_s']:.2f} |")
    say("\n".join(lines))
    result = {"environment": env, "levels": rows}
    if cfg.json:
        from ..formats.fs import write_json_atomic
        write_json_atomic(Path(cfg.json), result)
    return result
