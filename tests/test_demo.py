"""The README's main job on the bundled model (one preset, to stay fast)."""
from vitquant.demo import run_demo


def test_demo_on_bundled_model(capsys):
    rows = run_demo(presets=["w8a8"], progress=False)
    out = capsys.readouterr().out
    assert "| W8A8" in out and "float32" in out
    flt, w8 = rows[0], rows[1]
    assert flt[2] > 90  # the shipped model is a working classifier
    assert abs(w8[2] - flt[2]) <= 0.5 and w8[4] >= 98  # W8A8 barely changes predictions
    assert 3.5 < w8[6] < 4.1  # ~4x smaller: int8 weights, fp32 LayerNorms/embeddings/biases
