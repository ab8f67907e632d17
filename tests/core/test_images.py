"""Every image mode PIL opens is converted with its values kept in range, or refused by name.

A 16-bit PNG used to load as an all-white photo (its 0..65535 values clipped to 255) and be
explained; float arrays outside 0..1 were clipped silently; an EXIF-rotated JPEG was explained
lying on its side. Each case writes a real file (or builds the PIL image) with a known pattern and
checks the pixels that come out: exact where the conversion is exact, +-1 where it rounds.
"""
import numpy as np
import pytest
from PIL import Image

from saliencykit import SaliencyError
from saliencykit.images import load_image

RAMP16 = np.linspace(0, 65535, 32 * 32).reshape(32, 32).round().astype(np.uint16)


def _rgb(source):
    out = load_image(source)
    assert out.mode == "RGB"
    return np.asarray(out).astype(int)


def _gray_ramp_expected():
    return np.round(RAMP16 / 257.0).astype(int)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_png_is_scaled_not_white(tmp_path, mode):
    path = tmp_path / ("ramp16.png" if mode == "I;16" else "ramp32.tiff")  # PNG cannot hold mode I
    img = Image.fromarray(RAMP16) if mode == "I;16" else Image.fromarray(RAMP16.astype(np.int32), mode="I")
    img.save(path)
    got = _rgb(path)
    assert (got[..., 0] == got[..., 2]).all()
    assert np.abs(got[..., 0] - _gray_ramp_expected()).max() <= 1  # lossless file, then /257 rounded
    assert got.min() == 0 and got.max() == 255 and 100 < got.mean() < 155  # a ramp, not all white


def test_16_bit_arrays_and_int_arrays():
    assert np.abs(_rgb(RAMP16)[..., 1] - _gray_ramp_expected()).max() == 0
    eight_bit_in_int32 = (np.arange(256).reshape(16, 16)).astype(np.int32)
    assert (_rgb(eight_bit_in_int32)[..., 0] == np.arange(256).reshape(16, 16)).all()
    with pytest.raises(SaliencyError, match="neither 8-bit .* nor 16-bit"):
        load_image(np.full((4, 4), 70000, dtype=np.int64))
    with pytest.raises(SaliencyError, match="values -1..3"):
        load_image(np.array([[-1, 3]], dtype=np.int16))


@pytest.mark.parametrize("arr,expected", [
    (np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),
    (np.array([[0.0, 127.6, 255.0]], dtype=np.float64), [0, 128, 255]),
])
def test_float_arrays_in_range(arr, expected):
    assert _rgb(arr)[0, :, 0].tolist() == expected


@pytest.mark.parametrize("arr,match", [
    (np.array([[-0.5, 0.5]]), "outside 0..1 and 0..255"),       # a normalised image, not pixels
    (np.array([[0.0, 300.0]]), "outside 0..1 and 0..255"),
    (np.array([[0.0, np.nan]]), "NaN"),
    (np.zeros((0, 4)), "empty"),
    (np.array([["a"]]), "must hold numbers"),
])
def test_float_arrays_out_of_range_are_refused(arr, match):
    with pytest.raises(SaliencyError, match=match):
        load_image(arr)


def test_float_mode_image(tmp_path):
    img = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32), mode="F")
    assert _rgb(img)[0, :, 0].tolist() == [0, 64, 255]
    path = tmp_path / "f.tiff"
    Image.fromarray(np.array([[0.0, 1000.0]], dtype=np.float32), mode="F").save(path)
    with pytest.raises(SaliencyError, match="32-bit float"):
        load_image(path)


def test_alpha_modes_are_composited_on_white(tmp_path):
    # fully transparent black -> white; opaque colours kept
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    assert _rgb(Image.fromarray(rgba, "RGBA"))[0, 0].tolist() == [10, 20, 30]
    assert _rgb(Image.fromarray(rgba, "RGBA"))[1, 1].tolist() == [255, 255, 255]
    la = Image.new("LA", (2, 2), (0, 0))
    assert (_rgb(la) == 255).all()
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0
    path = tmp_path / "p.png"
    pal.save(path, transparency=0)
    got = _rgb(path)
    assert got[0, 0].tolist() == [200, 0, 0] and got[1, 1].tolist() == [255, 255, 255]


def test_cmyk_and_ycbcr_convert(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(path)
    assert (np.abs(_rgb(path) - 255) <= 1).all()  # no ink is white (JPEG rounding: +-1)
    assert (np.abs(_rgb(Image.new("YCbCr", (2, 2), (0, 128, 128)))) <= 1).all()  # Y=0 is black


@pytest.mark.parametrize("mode", ["LAB", "HSV", "La", "RGBa"])
def test_modes_without_a_faithful_conversion_are_refused_by_name(mode):
    with pytest.raises(SaliencyError, match=f"mode {mode}"):
        load_image(Image.new(mode, (2, 2)))


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    # stored 40 wide x 20 tall, left half white; orientation 6 = shown rotated 90 degrees clockwise,
    # so the photo as shown is 20 wide x 40 tall with the white half on top
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    for source in (path, Image.open(path)):
        got = _rgb(source)
        assert got.shape == (40, 20, 3)
        assert got[:15].mean() > 250 and got[25:].mean() < 5


def test_rgb_pil_image_without_orientation_is_returned_as_is():
    img = Image.new("RGB", (4, 4))
    assert load_image(img) is img
