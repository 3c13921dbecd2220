import torch

from lseg import LSeg
from lseg.cli.main import main
from tests.model.test_original import save_lightning, tiny_original


def test_converted_folder_gives_the_same_logits_as_the_original_ckpt(tmp_path, capsys):
    ckpt = save_lightning(tiny_original(), tmp_path / "orig.ckpt")
    out = tmp_path / "converted"
    assert main(["convert", str(ckpt), str(out)]) == 0
    assert "verified" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    direct, converted = LSeg.from_pretrained(ckpt).eval(), LSeg.from_pretrained(out).eval()
    images, labels = torch.randn(1, 3, 48, 80), ["cat", "grass", "other"]
    with torch.no_grad():
        text = direct.encode_text(labels)
        assert torch.equal(direct(images, text).logits, converted(images, text).logits)


def test_non_checkpoint_input_is_one_line_error(tmp_path, capsys):
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("not a checkpoint")
    assert main(["convert", str(bogus), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lseg: error: cannot read checkpoint") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_folders(tmp_path, capsys, tiny_model):
    source = tiny_model.save_pretrained(tmp_path / "model")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    assert main(["convert", str(source), str(other)]) == 1
    assert "not an lseg model folder" in capsys.readouterr().err
    assert (other / "holiday.jpg").exists()
    target = tiny_model.save_pretrained(tmp_path / "existing")
    assert main(["convert", str(source), str(target)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(source), str(target), "--overwrite", "--no-verify"]) == 0
