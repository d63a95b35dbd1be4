"""`pip install hemaseg` without extras trains and predicts; a command that needs an extra says which."""

import json
import subprocess
import sys
import textwrap

BLOCKED = ("fastapi", "uvicorn", "multipart", "python_multipart", "starlette", "pydicom", "jpeg_ls", "highdicom",
           "pycocotools")

# Runs CLI commands in one fresh interpreter where the extras' libraries cannot be imported, as on a bare
# install; prints each command's exit code and stderr as a JSON line.
SCRIPT = textwrap.dedent("""
    import contextlib, importlib.abc, io, json, sys
    BLOCKED = {blocked!r}

    class Bare(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

    sys.meta_path.insert(0, Bare())
    from hemaseg.cli import main
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["-q", *argv])
        print(json.dumps({{"code": code, "stderr": err.getvalue()}}))
""")


def test_without_extras_hemaseg_trains_and_predicts_and_names_the_extra_it_lacks(tmp_path):
    data, run, pred = tmp_path / "data", tmp_path / "run", tmp_path / "pred"
    commands = [["synth", data, "--n", 12, "--size", 48],
                ["train", data, "--out", run, "--preset", "seed", "--size", 32, "--epochs", 1],
                ["predict", run, data / "images", "--out", pred, "--backend", "torch"],
                ["serve", run],
                ["synth", tmp_path / "series", "--series"]]
    script = tmp_path / "bare.py"
    script.write_text(SCRIPT.format(blocked=BLOCKED))
    proc = subprocess.run([sys.executable, str(script), json.dumps([[str(a) for a in c] for c in commands])],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(commands), proc.stderr[-3000:]
    synth, train, predict, serve, series = results
    assert synth["code"] == train["code"] == predict["code"] == 0, (train, predict)
    assert (pred / "predictions.csv").is_file() and (run / "best.pt").is_file()
    assert serve["code"] == 2 and serve["stderr"].strip().splitlines() == [
        "hemaseg serve: error: hemaseg serve needs uvicorn, which is not installed: pip install 'hemaseg[serve]'"]
    assert series["code"] == 2 and len(series["stderr"].strip().splitlines()) == 1
    assert "pip install 'hemaseg[dicom]'" in series["stderr"]
