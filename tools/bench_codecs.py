"""``ps-bench codecs``: bytes per push and encode/receive time of every registered codec, on a real gradient.

One gradient of the model (a backward pass on random images) is pushed through
each codec's worker-side encoder and the server-side receiver, in one process:
the bytes are what would cross the wire (every message, framing included), the
times are the encoder's and the receiver's alone (no network). Ratios are
against fp32 in the same run.
"""

from __future__ import annotations

import time

import torch

from paramhub.common import codec as wire
from paramhub.common import codecs
from paramhub.common.layout import PARAM, Layout
from paramhub.common.models import build_model
from paramhub.tools.bench_servers import NUM_CLASSES

DEFAULT_SPECS = ("fp32", "bf16", "fp16", "int8", "topk:ratio=0.01", "topk2bit:ratio=0.01")


def gradient_regions(model_name: str, image_size: int, seed: int = 0):
    """The model's layout and one real gradient (PARAM regions) with its buffers, as flat regions."""
    torch.manual_seed(seed)
    model = build_model(model_name, NUM_CLASSES)
    images = torch.randn(4, 3, image_size, image_size)
    torch.nn.functional.cross_entropy(model(images), torch.randint(NUM_CLASSES, (4,))).backward()
    layout = Layout.from_model(model)
    regions = layout.empty_regions()
    views = layout.views(regions)
    params = dict(model.named_parameters())
    for name, tensor in model.state_dict().items():
        views[name].copy_(params[name].grad if name in params else tensor)
    return layout, regions


def run(model_name: str = "resnet50", image_size: int = 64, specs=DEFAULT_SPECS, repeats: int = 3) -> dict:
    """Per codec spec: bytes per push, ratio to fp32, median encode and receive seconds."""
    layout, regions = gradient_regions(model_name, image_size)
    rows = []
    for spec in specs:
        codec = codecs.from_spec(spec)
        encoder = codecs.PushEncoder(codec, layout, torch.float32, wire.DEFAULT_CHUNK_BYTES)
        encode_s, receive_s = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            encoded = encoder.encode(regions)
            messages = list(encoded.messages())
            encode_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            receiver = codecs.PushReceiver(codecs.for_header(encoded.codec, encoded.sparse), layout, torch.float32,
                                           max_abs=1e8)
            for raw in messages:
                receiver.add(wire.decode_push_message(raw))
            receiver.finish(encoded.sparse_values)
            receive_s.append(time.perf_counter() - start)
        rows.append({"codec": codec.spec, "bytes": sum(len(m) for m in messages),
                     "pairs": encoded.sparse_values, "encode_s": sorted(encode_s)[repeats // 2],
                     "receive_s": sorted(receive_s)[repeats // 2]})
    fp32 = next((r["bytes"] for r in rows if r["codec"] == "fp32"), None)
    for row in rows:
        row["fewer_bytes_than_fp32"] = fp32 / row["bytes"] if fp32 else None
    params = sum(layout.regions[r].numel for r in layout.region_indices(PARAM))
    return {"model": model_name, "params": params, "rows": rows}


def format_table(result: dict) -> str:
    """A plain-text table of ``run``'s result."""
    lines = [f"codecs: {result['model']} ({result['params'] / 1e6:.1f}M parameters), one real gradient",
             f"{'codec':<22} {'MB/push':>9} {'x fewer':>8} {'encode ms':>10} {'receive ms':>11}"]
    for r in result["rows"]:
        ratio = f"{r['fewer_bytes_than_fp32']:.1f}" if r["fewer_bytes_than_fp32"] else "-"
        lines.append(f"{r['codec']:<22} {r['bytes'] / 1e6:>9.2f} {ratio:>8} {r['encode_s'] * 1e3:>10.0f} "
                     f"{r['receive_s'] * 1e3:>11.0f}")
    return "\n".join(lines)
