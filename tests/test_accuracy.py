"""Real accuracy: ViT-Tiny with the shared pretrained weights on the 500 shared ImageNet images.

One pass over the images evaluates every training-free method (each image decoded once).
Bounds are the issues' acceptance criteria, in top-1 points below the unreduced model.
"""
from __future__ import annotations

import copy

import pytest
from conftest import VIT_TINY

import tokensparse
from tokensparse.measure import evaluate_many
from tokensparse.models import create_model

# spec -> allowed top-1 drop (points) vs. unreduced
BOUNDS = {
    "tome:r=13": 2.0,
    "evit:keep_rate=0.7": 3.0,
}


@pytest.fixture(scope="module")
def results(vit_tiny_weights, images_dir, wnids_file):
    base = create_model(VIT_TINY, weights=vit_tiny_weights)
    models = {"none": base}
    for spec in BOUNDS:
        models[spec] = tokensparse.patch(copy.deepcopy(base), spec)
    return evaluate_many(models, images_dir, wnids_file, reference_key="none", progress=False)


def test_unreduced_matches_reference_accuracy(results):
    assert results["none"]["n"] == 500
    assert results["none"]["top1"] == pytest.approx(82.6, abs=0.01)


@pytest.mark.parametrize("spec", list(BOUNDS))
def test_reduced_accuracy_within_bound(results, spec):
    drop = results["none"]["top1"] - results[spec]["top1"]
    assert drop <= BOUNDS[spec], f"{spec}: top-1 {results[spec]['top1']:.1f} (drop {drop:.1f})"
    assert results[spec]["agreement"] >= 85.0
