"""pixels.py and films.py: which file a name means, which cache is read, how a 16-bit film is scaled."""

import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr14.films import load_image
from cxr14.pixels import CachedImages, FilmImages, evaluation_images, index_images


def test_of_two_films_of_one_name_the_first_in_path_order_is_used_and_said(tmp_path):
    for folder, value in (("b", 200), ("a", 100), ("c/deeper", 50)):
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / folder / "00000001_000.png")
    with pytest.warns(UserWarning, match="occur twice"):
        found = index_images(tmp_path)
    assert found["00000001_000.png"] == tmp_path / "a" / "00000001_000.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "00000001_000.png")  # at the top: first of all
    with pytest.warns(UserWarning):
        assert index_images(tmp_path)["00000001_000.png"] == tmp_path / "00000001_000.png"


@pytest.mark.parametrize("brightest, bits", [(4095, 12), (4096, 14), (1023, 10), (1024, 12), (255, 8), (256, 10)])
def test_a_16_bit_film_is_scaled_by_the_smallest_bit_depth_that_holds_its_brightest_pixel(tmp_path, brightest, bits):
    pixels = np.array([[0, brightest // 2, brightest]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "film.png")
    assert Image.open(tmp_path / "film.png").mode.startswith("I")
    expected = np.clip(np.round(pixels * (255.0 / (2**bits - 1))), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(load_image(tmp_path / "film.png"), expected)


def test_a_cache_of_another_size_is_never_read_as_this_size(tmp_path):
    import cache
    from demo_data import write_demo

    write_demo(tmp_path, patients=4, size=64, seed=0)
    built = cache.build_cache(tmp_path, size=32, workers=1)
    built.rename(tmp_path / "cache_40")  # a 32-px cache where a 40-px one is looked for
    index = pd.read_csv(tmp_path / "cache_40" / "index.csv")
    paths = [str(next(tmp_path.rglob(name))) for name in index.image_name]
    rows = pd.DataFrame({"image_name": index.image_name, "path": paths})
    images = evaluation_images(rows, tmp_path, 40)
    assert isinstance(images, FilmImages) and images[0].shape == (40, 40)
    np.testing.assert_array_equal(images[0], load_image(paths[0], 40))
    assert CachedImages(tmp_path / "cache_40", index.image_name).size == 32


def test_a_training_run_refuses_a_cache_folder_of_another_size(tmp_path):
    import cache
    import train
    from demo_data import write_demo
    from helpers import tiny_settings

    write_demo(tmp_path / "data", patients=12, size=64, seed=0)
    folder = cache.build_cache(tmp_path / "data", size=32, workers=1)
    with warnings.catch_warnings(), pytest.raises(SystemExit) as stopped:
        warnings.simplefilter("ignore")
        train.main(tiny_settings(tmp_path / "data", tmp_path / "run", load_size=40, cache=folder))
    assert "32-px" in str(stopped.value.code) and "LOAD_SIZE is 40" in str(stopped.value.code)


def test_a_jpeg_is_read_upright_as_its_exif_orientation_says(tmp_path):
    upright = np.zeros((40, 24), np.uint8)
    upright[:10] = 255  # bright at the top
    stored = Image.fromarray(np.rot90(upright, 1).copy())  # stored turned: EXIF orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=100)
    pixels = load_image(tmp_path / "turned.jpg")
    assert pixels.shape == (40, 24) and pixels[:10].mean() > 200 and pixels[20:].mean() < 30
