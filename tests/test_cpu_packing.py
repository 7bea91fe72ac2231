"""oneDNN-prepacked linears against the model as transformers loads it: same outputs up to float
rounding, same greedy answers, and a clean refusal where packing can't apply."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from llavamed.model.checkpoint import load_llava  # noqa: E402
from llavamed.model.cpu_packing import (  # noqa: E402
    PackedLinear,
    is_packed,
    pack_linears,
    packing_supported,
)

pytestmark = pytest.mark.skipif(
    packing_supported(torch.float32) is not None, reason="no oneDNN linear packing in this torch"
)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24), (3, 1, 24)])
def test_packed_linear_equals_linear(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        want = lin(x)
        got = PackedLinear(lin)(x)
        # a non-contiguous input (a decode step's last position) too
        wide = torch.randn(shape[0], 3, 24)[:, -1, :]
        assert torch.allclose(PackedLinear(lin)(wide), lin(wide), atol=1e-5)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)


def test_packed_linear_bf16_close_or_refused_where_the_cpu_cannot():
    """oneDNN packs bf16 weights only on CPUs with avx_ne_convert or AVX512BW/VL/DQ; on an
    AVX2-only CPU its reorder raises. There packing must say why and leave the model as it was
    (the serving path falls back to plain F.linear), not crash."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(4, 64).to(torch.bfloat16)
    reason = packing_supported(torch.bfloat16)
    if reason is None:
        with torch.no_grad():
            got = PackedLinear(lin)(x).float()
        assert torch.allclose(got, lin(x).float(), atol=0.05, rtol=0.02)
    else:
        assert "packing failed" in reason, reason
        model = nn.Sequential(lin)
        assert pack_linears(model) == 0 and model[0] is lin


def test_packing_refuses_what_it_cannot_pack():
    assert "not float32 or bfloat16" in packing_supported(torch.float16)
    assert "not the CPU" in packing_supported(torch.float32, "meta")
    half = nn.Sequential(nn.Linear(8, 8).to(torch.float16))
    assert pack_linears(half) == 0
    assert type(half[0]) is nn.Linear  # left exactly as it was


def test_only_plain_linears_are_swapped():
    class Custom(nn.Linear):  # e.g. a LoRA layer: its own forward must survive
        pass

    model = nn.Sequential(nn.Linear(8, 8), Custom(8, 8), nn.Sequential(nn.Linear(8, 4)))
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert type(model[1]) is Custom
    assert is_packed(model) and not model.training


def test_packed_llava_matches_unpacked_logits_and_greedy_answers(wide_llava_dir):
    """Every linear of the LM, projector and vision tower packed; logits of a batch with an
    image equal the unpacked model's, and greedy generation gives the same tokens."""
    plain, processor = load_llava(wide_llava_dir)
    packed, _ = load_llava(wide_llava_dir)
    n_linear = sum(type(m) is nn.Linear for m in plain.modules())
    assert pack_linears(packed) == n_linear > 10
    assert not any(type(m) is nn.Linear for m in packed.modules())

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Lesion?"}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    enc = processor(text=[text], images=[img], return_tensors="pt")
    with torch.inference_mode():
        want = plain(**enc).logits
        got = packed(**enc).logits
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        kw = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
        a = plain.generate(**enc, **kw)
        b = packed.generate(**enc, **kw)
    assert torch.equal(a, b)
    assert len(set(a[0, enc["input_ids"].shape[1] :].tolist())) > 1  # a comparison that can fail


def test_engine_packs_by_default_and_answers_as_unpacked_generate(wide_llava_dir):
    from llavamed.serve.engine import Engine, SamplingParams

    plain, processor = load_llava(wide_llava_dir)
    eng = Engine.from_path(wide_llava_dir)
    off = Engine.from_path(wide_llava_dir, pack_weights=False)
    try:
        assert is_packed(eng.model) and not is_packed(off.model)
        eng.eos_ids = set()
        import numpy as np
        from PIL import Image

        params = SamplingParams(max_tokens=6, temperature=0)
        for seed, q in [(0, "What is shown?"), (1, "Which side?"), (0, "Any lesion?")]:
            rng = np.random.default_rng(seed)
            img = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            prompt = eng.prepare(conv, [img])
            ids = torch.tensor([prompt.input_ids])
            with torch.inference_mode():
                ref = plain.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    pixel_values=prompt.pixel_values,
                    do_sample=False,
                    max_new_tokens=6,
                    min_new_tokens=6,
                    pad_token_id=eng.pad_id,
                    suppress_tokens=eng.banned_ids or None,
                )
            want = processor.tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
            assert eng.generate(prompt, params).text == want
    finally:
        eng.close()
        off.close()


def test_cli_flag_turns_packing_off():
    from llavamed.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--model", "x"]).pack_weights is True
    assert parser.parse_args(["serve", "--model", "x", "--no-pack-weights"]).pack_weights is False
    args = parser.parse_args(
        ["eval", "vqa", "--model", "m", "--dataset", "slake", "--data", "d", "--no-pack-weights"]
    )
    assert args.pack_weights is False


def test_serve_in_background_passes_the_packing_choice(tiny_llava_dir):
    from llavamed.serve.api import serve_in_background

    for pack in (True, False):
        srv = serve_in_background(tiny_llava_dir, pack_weights=pack)
        try:
            assert is_packed(srv.engine.model) is pack
        finally:
            srv.stop()
