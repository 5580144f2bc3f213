"""The `reversal` study: its corpus, and on a reduced configuration trained for real (8 entities per group, one
seed), the direction of the result: the forward fact is learned and the reverse is not (Berglund's rank); removing
a fact's sentences lowers its forward log-odds; the Both group is the positive control, whose reverse drops more
than a forward-only fact's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from retrain import load_study, train
from retrain.engine import measure
from retrain.studies.reversal import CONNECTORS, HELD_OUT, OPENERS, TRAINED, Reversal

pytestmark = pytest.mark.full  # trains small GPT-2 models


class SmallReversal(Reversal):
    """8 entities per group, one seed: the reduced configuration of the tests."""

    entities_per_group = 8
    recipe = dataclasses.replace(Reversal.recipe, seeds=1)


def test_corpus_groups_templates_and_tokens():
    study = Reversal()
    train_split = study.data["train"]
    assert set(train_split.column_names) >= {"x", "y", "entity", "group", "direction"}
    e, n_templates = study.entities_per_group, len(TRAINED)
    assert study.n_train == e * (n_templates * 4 + 3)  # N2D and D2N one direction each, Both two; rosters
    directions = {g: set() for g in ("NameToDescription", "DescriptionToName", "Both")}
    for group, direction in zip(train_split["group"], train_split["direction"]):
        directions[group].add(direction)
    assert directions == {"NameToDescription": {"forward", "roster"}, "DescriptionToName": {"reverse", "roster"},
                          "Both": {"forward", "reverse", "roster"}}
    vocab = study.tokenizer.get_vocab()
    sentences = {tuple(x) for x in train_split["x"]}
    for o, c in HELD_OUT:  # held-out (opener, connector) pairs never occur in training ...
        pair = (vocab[OPENERS[o]], vocab[CONNECTORS[c]])
        assert not any(s[1] == pair[0] and pair[1] in s[3:] for s in sentences)
    assert set(OPENERS) | set(CONNECTORS) <= set(vocab)  # ... but each of their words does
    assert not any(a != b and b.startswith(a) for a in CONNECTORS for b in CONNECTORS)  # prefix-free
    names = [n for pairs in study.facts.values() for n, _ in pairs]
    descriptions = [d for pairs in study.facts.values() for _, d in pairs]
    assert len(set(names)) == len(set(descriptions)) == 3 * e
    assert Reversal().facts == study.facts  # from the corpus seed alone
    assert load_study("reversal").default_sets[0].startswith("group:column=entity,values=")


@pytest.fixture(scope="module")
def trained() -> tuple[SmallReversal, torch.Tensor, dict[str, torch.Tensor], list[str], torch.Tensor]:
    """(study, params [3, P], effect per removed entity [M], measurement ids, full model's measurements): the
    full-data model and the models without one NameToDescription and one Both entity (seed 0, paired)."""
    study = SmallReversal()
    study.flat  # noqa: B018
    entities = study.data["train"]["entity"]
    removed = [study.facts["NameToDescription"][0][0], study.facts["Both"][0][0]]
    masks = torch.ones(3, study.n_train)
    for k, name in enumerate(removed, start=1):
        masks[k, [i for i, e in enumerate(entities) if e == name]] = 0
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        params = train(study, masks, [0, 0, 0]).params
    values = measure(study, params)
    return study, params, dict(zip(removed, values[1:] - values[0])), list(study.measurements()), values[0]


def test_the_model_learns_the_trained_direction_and_not_the_reverse(trained):
    study, _, _, ids, full = trained
    value = lambda mid: full[ids.index(mid)].item()  # noqa: E731
    chance = (study.entities_per_group + 1) / 2
    for kind in ("trained", "heldout"):
        assert value(f"rank/forward/{kind}/NameToDescription") == 1.0
        assert value(f"rank/reverse/{kind}/Both") == 1.0
        assert value(f"rank/reverse/{kind}/NameToDescription") > 0.5 * chance  # Berglund: near chance


def test_removal_changes_the_forward_fact_not_its_reverse_and_both_is_the_positive_control(trained):
    study, _, effects, ids, _ = trained
    n2d, both = study.facts["NameToDescription"][0][0], study.facts["Both"][0][0]
    effect = lambda name, mid: effects[name][ids.index(mid)].item()  # noqa: E731
    forward = effect(n2d, f"forward/heldout/NameToDescription/{n2d}")
    reverse = effect(n2d, f"reverse/heldout/NameToDescription/{n2d}")
    control = effect(both, f"reverse/heldout/Both/{both}")
    print(f"effects: N2D forward {forward:.3f}, reverse {reverse:.3f}; Both reverse {control:.3f}")
    assert forward < -1.0  # the forward fact was learned from these sentences
    assert control < -1.0  # positive control: a fact trained in both orders loses its reverse too
    assert control < reverse - 1.0  # the contrast: a forward-only fact's removal costs its reverse less
