"""`evalgap diagnose --torch-model module:factory --weights file.pt`."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from evalgap.cli import main  # noqa: E402


def make_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4, momentum=0.001), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_torch_model_from_factory_and_weights(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 64)
    x = (rng.normal(0, 20, (64, 8, 8, 3)) + 60 * y[:, None, None, None]).clip(0, 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    torch.manual_seed(0)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).float()
    for _ in range(30):
        loss = nn.functional.cross_entropy(net(xt), torch.from_numpy(y).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    spec = f"{__name__}:make_net"
    code = main(["diagnose", "--torch-model", spec, "--weights", str(tmp_path / "w.pt"), "--npz", str(tmp_path / "d.npz"),
                 "--batch-size", "16", "-q", "--json", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["framework"] == "torch" and report["causes"][0]["term"] == "stale_moving_statistics"
    # weights that do not match the factory: exit 2, named
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    assert main(["diagnose", "--torch-model", spec, "--weights", str(tmp_path / "bad.pt"), "--npz", str(tmp_path / "d.npz")]) == 2
    err = capsys.readouterr().err
    assert "do not match" in err and "Missing key(s)" in err and "Give the --torch-model factory" in err
    assert main(["diagnose", "--torch-model", "no_such_module:f", "--npz", str(tmp_path / "d.npz")]) == 2


def _trained_files(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 64)
    x = (rng.normal(0, 20, (64, 8, 8, 3)) + 60 * y[:, None, None, None]).clip(0, 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    torch.manual_seed(0)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).float()
    for _ in range(20):
        loss = nn.functional.cross_entropy(net(xt), torch.from_numpy(y).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    return x, y


def test_torch_recalibrate_writes_a_state_dict_with_exact_statistics(tmp_path, capsys):
    import evalgap.torch as eg

    x, y = _trained_files(tmp_path)
    spec = f"{__name__}:make_net"
    before = (tmp_path / "w.pt").read_bytes()
    args = ["recalibrate", "--torch-model", spec, "--weights", str(tmp_path / "w.pt"), "--npz", str(tmp_path / "d.npz"),
            "--batch-size", "16", "-q"]
    assert main(args + ["-o", str(tmp_path / "fixed.pt")]) == 0
    assert (tmp_path / "w.pt").read_bytes() == before  # never over the input without --in-place
    fixed = torch.load(tmp_path / "fixed.pt", weights_only=True)
    # independent reference: the same shuffled batches (seed 0), float64 moments of the BN input
    net = make_net()
    net.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    order = np.random.default_rng(0).permutation(64)
    xt = torch.from_numpy(x[order].transpose(0, 3, 1, 2).copy()).double()
    with torch.no_grad():
        h = nn.functional.conv2d(xt, net[0].weight.double(), net[0].bias.double(), stride=2, padding=1)
    np.testing.assert_allclose(fixed["1.running_var"].double().numpy(), h.var((0, 2, 3), unbiased=False).numpy(), rtol=1e-5)
    unchanged = {k for k in fixed if not k.startswith("1.running_")}
    assert all(torch.equal(fixed[k], net.state_dict()[k]) for k in unchanged)
    # the written statistics close the gap: diagnose of the fixed weights finds nothing stale
    args2 = ["diagnose", "--torch-model", spec, "--weights", str(tmp_path / "fixed.pt"), "--npz", str(tmp_path / "d.npz"),
             "--batch-size", "16", "-q", "--json", str(tmp_path / "r.json")]
    assert main(args2) == 0
    assert abs(json.loads((tmp_path / "r.json").read_text())["metrics"]["accuracy"]["terms"]["stale_moving_statistics"]) < 0.01
    # --in-place replaces the weights file itself
    assert main(args + ["--in-place"]) == 0
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True)["1.running_var"], fixed["1.running_var"])
    assert eg is not None


def not_a_module():
    return "a string"


def test_bad_torch_input_exits_2_with_one_line(tmp_path, capsys):
    _trained_files(tmp_path)
    data = ["--npz", str(tmp_path / "d.npz"), "-q"]
    out = ["-o", str(tmp_path / "fixed.pt")]
    cases = [
        (["--torch-model", f"{__name__}:no_such_factory", *out], "cannot import"),
        (["--torch-model", f"{__name__}:not_a_module", *out], "not a torch.nn.Module"),
        (["--torch-model", f"{__name__}:make_net", "--weights", str(tmp_path / "missing.pt"), *out], "does not exist"),
        (["--torch-model", f"{__name__}:make_net", "--weights", str(tmp_path / "w.pt"), "-o", str(tmp_path / "no" / "dir" / "f.pt")], "does not exist"),
        (["--torch-model", f"{__name__}:make_net", "--weights", str(tmp_path / "w.pt"), "-o", str(tmp_path / "w.pt")], "--in-place"),
        (["--torch-model", f"{__name__}:make_net", "--weights", str(tmp_path / "w.pt")], "give -o"),
    ]
    for extra, message in cases:
        assert main(["recalibrate", *extra, *data]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (extra, err)
    (tmp_path / "text.pt").write_text("not weights")
    assert main(["diagnose", "--torch-model", f"{__name__}:make_net", "--weights", str(tmp_path / "text.pt"), *data]) == 2
    assert "torch.load" in capsys.readouterr().err


def test_version_and_exit_codes_in_help(capsys):
    import evalgap

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"evalgap {evalgap.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit status:" in out and "2  bad input" in out and "1  diagnose: the gap exceeds --fail-over" in out


def test_npz_saved_channels_first_reads_as_the_same_images(tmp_path):
    # an npz saved from PyTorch holds NCHW images: the layout is read from the model's first convolution
    x, y = _trained_files(tmp_path)
    np.savez(tmp_path / "nchw.npz", x=x.transpose(0, 3, 1, 2).copy(), y=y)
    spec = f"{__name__}:make_net"
    reports = {}
    for name in ("d", "nchw"):
        assert main(["diagnose", "--torch-model", spec, "--weights", str(tmp_path / "w.pt"), "--npz", str(tmp_path / f"{name}.npz"),
                     "--batch-size", "16", "-q", "--json", str(tmp_path / f"{name}.json")]) == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for metric, entry in reports["d"]["metrics"].items():
        assert reports["nchw"]["metrics"][metric]["values"] == pytest.approx(entry["values"], rel=1e-6)
    # the layout rule itself, with and without a convolution to ask
    from evalgap._cli_io import _layout

    assert _layout((5, 3, 8, 8), 3) == "NCHW" and _layout((5, 8, 8, 3), 3) == "NHWC" and _layout((5, 3, 8, 3), 3) == "NHWC"
    assert _layout((5, 3, 32, 32), None) == "NCHW" and _layout((5, 32, 32, 3), None) == "NHWC"


def test_a_bad_npz_and_labels_that_are_not_class_indices_exit_2_with_one_line(tmp_path, capsys):
    """A corrupt or pickled .npz, string labels, float labels: exit 2 and one line. Float labels are not cut to class
    indices (0.5 -> 0): they reach the API's own check, which gives the same error for the same arrays."""
    import evalgap.torch as eg
    from evalgap import DataError

    x, y = _trained_files(tmp_path)
    (tmp_path / "not_zip.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "objects.npz", x=x, y=y.astype(object))
    np.savez(tmp_path / "strings.npz", x=x, y=np.array(["a", "b", "c"])[y])
    halves = y + 0.5
    np.savez(tmp_path / "floats.npz", x=x, y=halves)
    with pytest.raises(DataError) as api:  # the same arrays through the API
        eg.diagnose(make_net(), (torch.from_numpy(x).permute(0, 3, 1, 2).float(), torch.from_numpy(halves)), batch_size=16,
                    progress=False)
    cases = [("not_zip", "not a valid .npz of numeric arrays"), ("objects", "not a valid .npz of numeric arrays"),
             ("strings", "labels must be numbers"), ("floats", str(api.value))]
    for name, message in cases:
        recalibrate = ["recalibrate", "-o", str(tmp_path / "fixed.pt")]
        for command in (["diagnose"], recalibrate) if name != "floats" else (["diagnose"],):  # recalibrate scores no labels
            argv = [*command, "--torch-model", f"{__name__}:make_net", "--weights", str(tmp_path / "w.pt"),
                    "--npz", str(tmp_path / f"{name}.npz"), "--batch-size", "16", "-q"]
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert message in err and len(err.splitlines()) == 1 and "allow_pickle" not in err, (name, err)
    assert not (tmp_path / "fixed.pt").exists()


def test_torch_arrays_keep_the_labels_kind():
    from evalgap import DataError
    from evalgap._cli_io import torch_arrays

    x = np.zeros((4, 8, 8, 3), np.uint8)
    assert torch_arrays(x, np.arange(4, dtype=np.uint8))[1].dtype == torch.int64
    assert torch_arrays(x, np.array([0.5, 1.5, 2.5, 0.0]))[1].tolist() == [0.5, 1.5, 2.5, 0.0]
    whole = torch_arrays(x, np.array([0.0, 2.0, 1.0, 2.0]))[1]  # class ids stored as floats (pandas): class ids
    assert whole.dtype == torch.int64 and whole.tolist() == [0, 2, 1, 2]
    with pytest.raises(DataError, match="images must be numbers"):
        torch_arrays(np.array(["a"] * 4), np.arange(4))


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "five"])
def test_fail_over_must_be_a_number_of_at_least_0(value, capsys):
    from evalgap.cli import build_parser

    with pytest.raises(SystemExit) as done:
        main(["diagnose", "--torch-model", f"{__name__}:make_net", "--npz", "d.npz", "--fail-over", value])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "argument --fail-over: expected a number >= 0" in err and "Traceback" not in err, err
    assert build_parser().parse_args(["diagnose", "m.keras", "--npz", "d.npz", "--fail-over", "0"]).fail_over == 0


def make_gray_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _never_diagnosed(monkeypatch):
    import evalgap.torch as eg

    monkeypatch.setattr(eg, "diagnose", lambda *a, **k: pytest.fail("a pass ran before the classes were checked"))


def test_data_of_more_classes_than_the_model_has_outputs_exit_2_before_any_pass(tmp_path, monkeypatch, capsys):
    """5 class folders and a 3-class model said one batch's range ("they range over [1, 3]"); an npz of labels 0-4
    likewise. Both numbers and the fix, one line, before any pass; the model's modes and torch's RNG unchanged."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for c in "abcde":
        (tmp_path / "five" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "five" / c / f"{i}.png")
    np.savez(tmp_path / "five.npz", x=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), y=np.arange(10) % 5)
    monkeypatch.setenv("EVALGAP_CACHE", str(tmp_path / "cache"))
    with monkeypatch.context() as m:
        _never_diagnosed(m)
        for data, said in ((["--data", str(tmp_path / "five"), "--image-size", "8"], f"--data {tmp_path / 'five'} holds 5 classes"),
                           (["--npz", str(tmp_path / "five.npz")], f"--npz {tmp_path / 'five.npz'} has labels up to 4, so 5 classes")):
            assert main(["diagnose", "--torch-model", f"{__name__}:make_net", *data, "--batch-size", "4", "-q"]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and said in err and "the model has 3 outputs" in err and "labels 3 to 4" in err, err
            assert "range over" not in err, err
    # the outputs are counted by one forward in evaluation mode that puts back every module's mode and torch's RNG
    from evalgap._cli_io import torch_output_classes

    net = nn.Sequential(make_net(), nn.Dropout(0.5))
    net[0][1].eval()  # a frozen BN stays frozen
    before = ({k: v.clone() for k, v in net.state_dict().items()}, torch.get_rng_state())
    assert torch_output_classes(net, torch.zeros(10, 3, 8, 8, dtype=torch.uint8)) == 3
    assert [m.training for m in net.modules()] == [True, True, True, False, True, True, True, True, True]
    assert all(torch.equal(v, before[0][k]) for k, v in net.state_dict().items()) and torch.equal(torch.get_rng_state(), before[1])
    assert torch_output_classes(net, torch.zeros(10, 5, 8, 8)) is None  # a forward that fails: the passes say why
    # modes are set by flag as the passes set them: a train() the model overrides (a hook, a freezing rule) is not called

    class Hooked(nn.Sequential):
        def train(self, mode=True):
            raise AssertionError("the model's train() was called")

    hooked = Hooked(*make_net())
    assert torch_output_classes(hooked, torch.zeros(10, 3, 8, 8, dtype=torch.uint8)) == 3
    assert all(m.training for m in hooked.modules())
    # 3 classes of 5 outputs are fine: the passes run
    np.savez(tmp_path / "three.npz", x=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8), y=np.arange(12) % 3)
    assert main(["diagnose", "--torch-model", f"{__name__}:make_net", "--npz", str(tmp_path / "three.npz"), "--batch-size", "4", "-q"]) == 0


def test_grayscale_npz_without_a_channel_axis_gets_one_for_a_one_channel_convolution(tmp_path, capsys):
    """x of shape (N, H, W) reached Conv2d as one image of batch-size channels ("expected input[1, 5, 32, 32] to have
    1 channels, but got 5 channels"). For a first convolution of 1 channel the axis is added (the same report as
    (N, 1, H, W)), said in the notes; for one of 3 channels, exit 2 naming the shape and the fix."""
    rng = np.random.default_rng(4)
    y = np.arange(20) % 3
    x = (rng.normal(0, 20, (20, 8, 8)) + 60 * y[:, None, None]).clip(0, 255).astype(np.uint8)
    np.savez(tmp_path / "gray.npz", x=x, y=y)
    np.savez(tmp_path / "gray_nchw.npz", x=x[:, None], y=y)
    reports = {}
    for name in ("gray", "gray_nchw"):
        assert main(["diagnose", "--torch-model", f"{__name__}:make_gray_net", "--npz", str(tmp_path / f"{name}.npz"),
                     "--batch-size", "5", "-q", "--json", str(tmp_path / f"{name}.json")]) == 0, capsys.readouterr().err
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reports["gray"]["metrics"] == reports["gray_nchw"]["metrics"]
    assert "images of shape (20, 8, 8) read as one channel, (N, 1, H, W)" in reports["gray"]["notes"][0], reports["gray"]["notes"]
    capsys.readouterr()
    assert main(["diagnose", "--torch-model", f"{__name__}:make_net", "--npz", str(tmp_path / "gray.npz"), "--batch-size", "5", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "x has shape (20, 8, 8): images without a channel axis" in err, err
    assert "first convolution takes 3 channels" in err and "np.repeat(x[:, None], 3, axis=1)" in err and "got 5 channels" not in err, err


def test_max_samples_below_one_batch_is_said_in_the_help_and_the_notes(tmp_path, capsys):
    """--max-samples 3 --batch-size 4 used 4 samples while the help said "at most N": the help says whole batches, at
    least one, and the report's notes (and recalibrate's) say how many samples were used."""
    _trained_files(tmp_path)
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    assert "at least one" in " ".join(capsys.readouterr().out.split())
    common = ["--torch-model", f"{__name__}:make_net", "--weights", str(tmp_path / "w.pt"), "--npz", str(tmp_path / "d.npz"),
              "--batch-size", "4", "-q"]
    said = "--max-samples 3: 4 samples were used, more than 3, since the passes take whole batches of --batch-size 4, at least one."
    assert main(["diagnose", *common, "--max-samples", "3", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"] == 4 and said in report["notes"], report["notes"]
    capsys.readouterr()
    assert main(["recalibrate", *common, "--max-samples", "3", "-o", str(tmp_path / "f.pt")]) == 0
    assert said in " ".join(capsys.readouterr().out.split())
    assert main(["diagnose", *common, "--max-samples", "8", "--json", str(tmp_path / "r8.json")]) == 0  # whole batches: no note
    assert not any("--max-samples" in n for n in json.loads((tmp_path / "r8.json").read_text())["notes"])
