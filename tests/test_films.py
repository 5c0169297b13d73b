"""Opening films: DICOM as radiology stores it (modality LUT, VOI LUT or window, MONOCHROME1, compressed transfer
syntaxes, header checks), on files pydicom ships and files these tests write."""

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from cxr14.films import DataError, open_film
from helpers import write_dicom

RAMP = np.tile(np.linspace(0, 4095, 256).round().astype(np.uint16), (64, 1))  # 12-bit stored values, left to right


def test_a_window_maps_its_range_to_black_and_white_and_monochrome1_is_inverted(tmp_path):
    window = write_dicom(tmp_path / "window.dcm", RAMP, WindowCenter=2048, WindowWidth=1024)
    pixels = open_film(window).pixels[0].astype(int)
    assert (pixels[RAMP[0] <= 1530] == 0).all() and (pixels[RAMP[0] >= 2566] == 255).all()  # clipped outside
    assert abs(pixels[np.argmin(np.abs(RAMP[0].astype(int) - 2048))] - 128) <= 2  # the centre is mid-gray
    plain = open_film(write_dicom(tmp_path / "plain.dcm", RAMP)).pixels[0].astype(int)
    assert plain[0] == 0 and plain[-1] == 255 and (np.diff(plain) >= 0).all()  # no window: the film's own range
    inverted = open_film(
        write_dicom(
            tmp_path / "m1.dcm", RAMP, WindowCenter=2048, WindowWidth=1024, PhotometricInterpretation="MONOCHROME1"
        )
    ).pixels[0]
    assert np.array_equal(inverted.astype(int), 255 - pixels)  # bright air becomes dark, as on a radiograph


def test_the_modality_lut_comes_before_the_window(tmp_path):
    """Stored values rescaled by slope 2 and intercept -1000 with the window in rescaled units give the same film
    as the unscaled values with the window in stored units."""
    rescaled = write_dicom(
        tmp_path / "rescaled.dcm", RAMP, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3096, WindowWidth=2047
    )
    stored = write_dicom(tmp_path / "stored.dcm", RAMP, WindowCenter=2048, WindowWidth=1024)
    difference = np.abs(open_film(rescaled).pixels.astype(int) - open_film(stored).pixels.astype(int))
    assert difference.max() <= 1


def test_a_voi_lut_sequence_is_applied(tmp_path):
    from pydicom.dataset import Dataset

    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new(0x00283006, "US", [int(v) for v in np.sqrt(np.arange(4096) / 4095) * 65535])  # LUT Data: a gamma
    film = open_film(write_dicom(tmp_path / "lut.dcm", RAMP, VOILUTSequence=[lut])).pixels[0].astype(int)
    middle = np.argmin(np.abs(RAMP[0].astype(int) - 1024))  # a quarter of the input range
    assert film[0] == 0 and film[-1] == 255 and abs(film[middle] - 128) <= 3  # sqrt(1/4) = 1/2 of the output


@pytest.mark.parametrize(
    "header, named",
    [
        ({"BodyPartExamined": "HAND"}, "BodyPartExamined is 'HAND'"),
        ({"ViewPosition": "LL"}, "ViewPosition is 'LL'"),
        ({"Modality": "MR"}, "Modality is 'MR'"),
    ],
)
def test_films_that_are_not_frontal_chest_radiographs_are_flagged(tmp_path, header, named):
    path = write_dicom(tmp_path / "film.dcm", RAMP, **header)
    film = open_film(path)
    assert len(film.warnings) == 1 and named in film.warnings[0]
    with pytest.raises(DataError, match=named.split(" is ")[0]) as refused:
        open_film(path, strict=True)
    assert "film.dcm" in str(refused.value) and "--strict" in str(refused.value)
    assert open_film(write_dicom(tmp_path / "chest.dcm", RAMP)).warnings == ()


def test_multi_frame_colour_and_image_less_dicom_are_refused_by_name(tmp_path):
    frames = write_dicom(tmp_path / "frames.dcm", np.stack([RAMP, RAMP]), NumberOfFrames=2)
    with pytest.raises(DataError, match="frames.dcm is a multi-frame DICOM"):
        open_film(frames)
    with pytest.raises(DataError, match="colour"):
        open_film(get_testdata_file("SC_rgb_rle.dcm"))  # shipped by pydicom
    with pytest.raises(DataError, match="holds no image"):
        open_film(get_testdata_file("rtplan.dcm"))
    with pytest.raises(DataError, match="multi-frame"):
        open_film(get_testdata_file("rtdose.dcm"))


def test_compressed_copies_of_shipped_films_open_as_the_uncompressed_one():
    """pydicom's own test films: one MR slice uncompressed and losslessly compressed three ways."""
    reference = open_film(get_testdata_file("MR_small.dcm"))
    assert "Modality is 'MR'" in reference.warnings[0]
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        assert np.array_equal(open_film(get_testdata_file(name)).pixels, reference.pixels), name


def test_a_missing_decoder_names_the_transfer_syntax_and_the_package(tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    path = write_dicom(tmp_path / "j2k.dcm", RAMP, compress=JPEG2000Lossless)
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})  # as if no JPEG 2000 plugin were installed
    with pytest.raises(DataError) as missing:
        open_film(path)
    message = str(missing.value)
    assert "j2k.dcm is compressed as JPEG 2000 Image Compression (Lossless Only)" in message
    assert "pip install pylibjpeg-openjpeg" in message
