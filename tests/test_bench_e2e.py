"""bench.e2e (one training step of a Llama-style model and a ViT, unpatched vs patched) on tiny CPU models:
the harness runs, writes its files, and the patched model computes the unpatched model's loss."""

import json

from optional import transformers_with_models

transformers_with_models()

from bench import e2e  # noqa: E402


def test_e2e_quick_on_cpu(tmp_path, capsys):
    code = e2e.main(["--device", "cpu", "--quick", "--warmup", "1", "--steps", "1", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "e2e-cpu.json").read_text())
    rows = {(row["model"], row["variant"]): row for row in report["rows"]}
    assert set(rows) == {(model, variant) for model in ("llama", "vit") for variant in ("eager", "fusedact")}
    for (model, variant), row in rows.items():
        assert row["median_ms"] > 0 and row["throughput"] > 0
        # fp32: the patched model's first loss is the unpatched one's up to fp32 rounding in a few kernels
        assert row["loss_vs_eager"] < 1e-5, (model, variant, row)
        assert (row["patched"] is None) == (variant == "eager")
    assert rows[("llama", "fusedact")]["patched"]["changes"] == 2  # the gated MLP and its act_fn
    assert report["environment"]["device_type"] == "cpu"
    assert "| llama | fusedact |" in (tmp_path / "e2e-cpu.md").read_text()
    assert "not the Triton kernels" in capsys.readouterr().out
