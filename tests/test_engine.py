import torch
from models import MLP
from torch.testing import assert_close

from hardmine.engine import GradientExtractor
from hardmine.extract import reference_per_sample_grads


def test_vmap_extractor_projects_exact_grads():
    model = MLP().double()
    batch = (torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 4, (5,)))
    ext = GradientExtractor(model, layers="fc2", dim=8, seed=3, engine="vmap")
    out = ext(batch)
    ref = reference_per_sample_grads(model, batch, params="fc2")
    assert out.z.shape == (5, ext.out_dim) == (5, 16)
    assert_close(out.z, ext.projector.project_grads(ref.grads))
    assert_close(out.grad_norm, ref.grad_norm)
    assert ext.metadata()["plan"] == {"fc2.weight": "vmap", "fc2.bias": "vmap"}
