"""The GPU paths of data.py and augment.py, checked without a GPU: device decisions on torch.device
values, host data reaching the pixels' device, and the order of copy and cat, on the 'meta' device
(shapes, no data)."""
import pytest
import torch

import augment as A
import data
import harness
from conftest import batch_augment, colour_op, one_line_exit_2, write_idx

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fake_cuda(monkeypatch, current=0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def test_bare_cuda_resolves_to_the_index_tensors_report(monkeypatch):
    """One resolution of --device for every script (harness.check_device): data.py takes its
    result."""
    # why: a bare device never equals a tensor's
    assert torch.device("cuda") != torch.device("cuda:0")
    fake_cuda(monkeypatch, current=1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert harness.check_device("cuda") == torch.device("cuda:1")
    assert harness.check_device(torch.device("cuda")) == torch.device("cuda:1")
    assert harness.check_device("cuda:0") == torch.device("cuda:0")
    assert harness.check_device("cpu") == torch.device("cpu")


def test_bare_cuda_without_cuda_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device",
                        lambda: pytest.fail("asked for the current CUDA device"))
    assert "no CUDA GPU" in one_line_exit_2(capsys, lambda: harness.check_device("cuda"))
    assert harness.check_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("src,dst,pin", [
    ("cpu", "cuda:0", True),  # pinned host memory -> GPU: the only copy that pinning helps
    ("cuda:0", "cuda:0", False),  # resident on the GPU: pin_memory() of a CUDA tensor raises
    ("cuda:0", "cuda:1", False),
    ("cuda:0", "cpu", False),
    ("cpu", "cpu", False),
    ("cpu", "meta", False),
])
def test_pin_only_from_the_host_to_a_gpu(src, dst, pin):
    assert data.pin_before_copy(torch.device(src), torch.device(dst)) is pin


def test_resident_images_take_the_resolved_device(monkeypatch):
    """The device that batch() compares with the images' is check_device's, also where free memory
    is asked."""
    fake_cuda(monkeypatch, current=0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    asked = []
    # too full
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: asked.append(d) or (0, 1 << 30))
    # no CUDA driver to pin with here
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    device = harness.check_device("cuda")
    r = data.ResidentImages(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.arange(4), device)
    assert r.device == torch.device("cuda:0") and asked == [torch.device("cuda:0")]
    # held on the host: batches are pinned, then copied
    assert data.pin_before_copy(r.images.device, r.device)


def test_resident_images_on_the_cpu_never_pin(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self: pytest.fail("pin_memory() on the CPU path"))
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    r = data.ResidentImages(images, torch.arange(6), "cpu")
    x, y = r.batch(torch.tensor([4, 1, 1]))
    assert torch.equal(x, images[[4, 1, 1]]) and y.tolist() == [4, 1, 1]


@CUDA
@pytest.mark.cuda  # make gpu-check runs it
# the images fit on the GPU, or are held in pinned host memory
@pytest.mark.parametrize("free", [None, 0])
def test_resident_images_on_a_bare_cuda_device(monkeypatch, free):
    if free is not None:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free, 1 << 30))
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    r = data.ResidentImages(images, torch.arange(6), harness.check_device("cuda"))
    x, y = r.batch(torch.tensor([4, 1]))
    assert x.is_cuda and y.is_cuda and torch.equal(x.cpu(), images[[4, 1]]) and y.tolist() == [4, 1]


# --------------------------------------------------------------------------------------------------
# augment.py: no tensor built from host data (a Python list, a number) on the pixels' device, where
# every call would be a blocking host-to-device copy. 'meta' stands in for the GPU: a device that is
# not the CPU.

@pytest.fixture
def host_data_on_device(monkeypatch):
    """The (function, data) of every torch.tensor / torch.as_tensor call that puts host data off the
    CPU."""
    made = []
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)

        def spy(obj, *args, _real=real, _name=name, **kwargs):
            out = _real(obj, *args, **kwargs)
            if not isinstance(obj, torch.Tensor) and out.device.type != "cpu":
                made.append((_name, obj))
            return out
        monkeypatch.setattr(torch, name, spy)
    torch.tensor([5.0, 3.0, 1.0], device="meta")  # what the spy is there to catch
    assert made == [("tensor", [5.0, 3.0, 1.0])]
    made.clear()
    return made


def meta_pixels(b=4, size=8, dtype=torch.float32):
    return torch.empty(b, 3, size, size, dtype=dtype, device="meta")


@pytest.mark.parametrize("op", [A.adjust_hue, colour_op(0), colour_op(1), colour_op(2)],
                         ids=["hue", "brightness", "contrast", "saturation"])
def test_colour_ops_copy_no_host_data_to_the_pixels_device(host_data_on_device, op):
    out = op(meta_pixels(), torch.empty(4, device="meta"))
    assert out.shape == (4, 3, 8, 8) and host_data_on_device == []


def test_batch_augment_copies_no_host_data_to_the_pixels_device(host_data_on_device):
    """Every op on (jitter with hue always, blur, grayscale, rotation), parameters on the CPU."""
    aug = batch_augment(8, jitter_p=1.0, gray_p=0.5, blur_p=0.5, rotate_p=0.5).to("meta")
    out = aug(meta_pixels(6, 12, torch.uint8), torch.Generator().manual_seed(0))
    assert out.shape == (12, 3, 8, 8) and out.device.type == "meta" and host_data_on_device == []


def test_luma_weights_are_torchvisions():
    torch.testing.assert_close(A.luma_weights(3), torch.tensor([0.2989, 0.587, 0.114]),
                               rtol=0, atol=0)
    torch.testing.assert_close(A.luma_weights(1), torch.tensor([1.0]), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# data.TwoViewBatches, per-image pipeline: each pinned view batch is copied, then the two are cat on
# the device.

class Images(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i


def two_views(img):
    return img + 1, img * 2  # view 1, view 2: each view's rows can be told apart


def test_per_image_batches_are_view1_then_view2():
    batches = data.TwoViewBatches(Images(), per_rank=3, rank=0, world=1, seed=0, device="cpu",
                                  transform=two_views)
    seen = 0
    for views, y in batches.epoch(0):
        n = len(y)
        x = Images().x[y]  # (n, 3, 4, 4) the batch's images
        assert views.shape == (2 * n, 3, 4, 4)
        assert torch.equal(views, torch.cat([x + 1, x * 2]))  # the same float ops: exact
        seen += 1
    assert seen == batches.steps_per_epoch == 2


def test_per_image_views_are_cat_on_the_device(monkeypatch):
    """A cat on the host would give an unpinned tensor whose copy to a GPU blocks; here the cat's
    inputs must already be on the (meta) device."""
    cats = []
    real = torch.cat

    def spy(tensors, *args, **kwargs):
        out = real(tensors, *args, **kwargs)
        cats.append(([t.device.type for t in tensors], out))
        return out
    monkeypatch.setattr(torch, "cat", spy)
    batches = data.TwoViewBatches(Images(), per_rank=3, rank=0, world=1, seed=0, device="meta",
                                  transform=two_views)
    for views, y in batches.epoch(0):
        assert (views.device.type == "meta" and y.device.type == "meta"
                and views.shape == (6, 3, 4, 4))
        inputs = [devices for devices, out in cats if out is views]
        assert inputs == [["meta", "meta"]]


def test_the_epochs_order_reaches_a_gpu_pinned_and_without_blocking(tmp_path, monkeypatch):
    """Batched pipeline with the images held on the GPU ('meta' stands in for it): each epoch's
    order goes to the device once, from pinned memory and non_blocking. A pageable copy blocks the
    host (the failure of the CUDA test that runs 30 steps under set_sync_debug_mode('error'), at the
    second epoch's start)."""
    ds = data.get_dataset("fashion-mnist", write_idx(tmp_path / "fm", n_train=12, n_test=4),
                          "train")
    batches = data.TwoViewBatches(ds, 4, 0, 1, 0, "cpu", batch_augment=lambda x, gen, sizes: x,
                                  image_size=28)
    batches.resident.images = batches.resident.images.to("meta")  # held on the "GPU"
    batches.resident.labels = batches.resident.labels.to("meta")
    batches.resident.device = torch.device("meta")
    monkeypatch.setattr(data, "pin_before_copy",
                        lambda src, dst: src.type == "cpu" and dst.type == "meta")
    pinned, copies = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self)
    real_to = torch.Tensor.to

    def to(self, *a, **k):
        # the (steps, n) order
        if a and str(a[0]) == "meta" and self.dtype == torch.long and self.dim() == 2:
            copies.append((any(self is p for p in pinned), k.get("non_blocking", False)))
        return real_to(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "to", to)
    for epoch in (0, 1):
        assert len(list(batches.epoch(epoch))) == 3
    assert copies == [(True, True), (True, True)]  # one pinned, non-blocking copy per epoch
