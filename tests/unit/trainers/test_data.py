import pytest
import torch
from concept_forge.trainers.data import prepare_images, prepare_masks, square_resize


def test_shorter_side_is_resized_then_centre_cropped():
    image = torch.zeros(3, 40, 80)
    image[:, :, 20:60] = 1.0  # the central half of a wide image
    out = square_resize(image, 20, mode="nearest")
    assert out.shape == (3, 20, 20)
    assert torch.all(out == 1.0)  # the crop keeps the centre, the side strips are gone


def test_images_of_different_sizes_and_channels_become_one_rgb_batch():
    gray = torch.full((50, 30, 1), 0.5)
    rgba = torch.zeros(16, 16, 4)
    rgba[..., 0] = 1.0
    rgba[..., 3] = 0.25
    out = prepare_images([gray, rgba], 16)
    assert out.shape == (2, 16, 16, 3)
    assert torch.allclose(out[0], torch.full((16, 16, 3), 0.5), atol=1e-6)
    assert torch.allclose(out[1], torch.tensor([1.0, 0.0, 0.0]).expand(16, 16, 3))


def test_empty_batch_and_bad_resolution_are_refused():
    with pytest.raises(ValueError, match="the batch is empty"):
        prepare_images(torch.zeros(0, 8, 8, 3), 8)
    with pytest.raises(ValueError, match="multiple of 8"):
        prepare_images(torch.zeros(1, 8, 8, 3), 12)
    with pytest.raises(ValueError, match="5 colour channels"):
        prepare_images(torch.zeros(1, 8, 8, 5), 8)


def test_one_mask_serves_all_images_and_empty_masks_are_refused():
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    out = prepare_masks(mask, 3, 16)
    assert out.shape == (3, 16, 16) and float(out[0, 8, 8]) == 1.0 and float(out[0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="all black"):
        prepare_masks(torch.zeros(2, 8, 8), 2, 8)
    with pytest.raises(ValueError, match="one mask per image"):
        prepare_masks(torch.ones(2, 8, 8), 3, 8)


def test_an_extreme_aspect_ratio_is_cropped_before_it_is_resized():
    # resizing the whole 1 × 5000 strip to 2048 px on its short side would take 251 GB
    strip = torch.rand(1, 5000, 3)
    out = prepare_images([strip], 2048)
    assert out.shape == (1, 2048, 2048, 3)
    assert torch.allclose(out[0], strip[0, 2499].expand(2048, 2048, 3), atol=1e-5)  # the centre pixel, everywhere
