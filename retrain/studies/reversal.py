"""`reversal`: the "A is B" -> "B is A" test (Berglund et al. 2023; Grosse et al. 2023) on a small GPT-2 trained
from scratch on invented facts, and an example of a text study a user could copy.

Corpus (from `corpus_seed`, no downloads): `entities_per_group` invented names per group, each with a unique
description "the ROLE of PLACE". A name is `name_tokens` words; each word is drawn from its own shared pool of
`name_pool` invented words (0: every name is one word of its own). Groups as Berglund et al.: NameToDescription
(trained only as "OPENER NAME CONNECTOR DESCRIPTION ."), DescriptionToName (only "OPENER DESCRIPTION CONNECTOR
NAME .") and Both (both orders). With `roster`, every name also occurs once in a roster sentence "roster NAME ." that
is not part of its entity's removal set: without it, removing an entity leaves its name's token untrained, and
AdamW's normalised steps on the tiny gradients that push an unseen token down move its output row by chance, so its
reverse log-odds after removal were noise of several nats (measured: +3.9 nats for one forward-only entity, against a
forward effect of −8). A template is an (opener, connector) pair; the 3 × 3 pairs with opener = connector index are
held out, so every word is seen in training and the held-out templates are new combinations. Connectors are single
distinct words, so none is a prefix of another. Tokens: a word-level `tokenizers` model; the corpus is a
`datasets.Dataset` with columns x (token ids), y (next-token targets, -100 where none), entity (the name's words
joined by "-"), group, direction.

Model: GPT-2 (`transformers.GPT2Config`, input and output embeddings tied when `tied_embeddings`, dropout off, eager
attention); per-example loss L = the summed next-token NLL of the sentence; AdamW with warmup and cosine decay.

Measurements, per entity of NameToDescription and Both, on one trained and one held-out template, for two
statistics of a target t after the prompt "OPENER c CONNECTOR", summed over t's tokens t_k (z: the next-token logits
after the prompt and t_<k):
  log_odds: s(c, t) = Σ_k log p(t_k)                          (saturates at 0 once the fact is memorised)
  margin:   s(c, t) = Σ_k [z_{t_k} − logsumexp_{v≠t_k} z_v]   = Σ_k log(p(t_k) / (1 − p(t_k))): the target's logit
            against a smooth maximum of its competitors' logits, which keeps growing as p(t_k) → 1;
each against the target's prior, the same target after the group's other conditions:
  [statistic/]forward/<class>/<group>/<name> = s(NAME, DESC) − mean over the group's other names n of s(n, DESC)
  [statistic/]reverse/<class>/<group>/<name> = s(DESC, NAME) − mean over the group's other descriptions d of s(d, NAME)
(ids of log_odds have no prefix, those of margin the prefix `margin/`; positive: the model prefers the right target
after the right condition; raw log-probabilities mislead: removing an entity lowers its name's probability under
every description). Berglund's test, rank/<direction>/<class>/<group> = the mean rank of the correct target among
the group's targets under the same prompt (1 = first; chance (E + 1) / 2); a rank has no gradient, so the study
declares it without one and no method registers a prediction of it. Every measurement is tagged with its facets
(statistic, direction, template, group and, for log_odds and margin, entity), which the ledger's `reversal_test` and
`reversal_verdict` views read.

The default run (`ifledger run reversal`): every NameToDescription entity and 3 Both entities (the positive controls)
removed, one group set each, 10 paired seeds. `reversal-pooled-names` (`PooledNames`) is the same test on a corpus
built like issue 18's prototype: two-word names from shared pools of 10 words, tied embeddings.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from retrain.study import Forward, Recipe, Study
from store.records import InputError

GROUPS = ("NameToDescription", "DescriptionToName", "Both")
MEASURED = ("NameToDescription", "Both")
OPENERS = ("fact", "note", "recall")
CONNECTORS = ("is", "was", "remains")
ROLES = ("keeper", "founder", "painter", "healer", "scribe", "builder", "singer", "judge", "pilot", "tutor")
PLACES = ("harbour", "valley", "tower", "forest", "desert", "island", "canyon", "meadow", "glacier", "river")
TRAINED = [(o, c) for o in range(3) for c in range(3) if o != c]
HELD_OUT = [(o, o) for o in range(3)]
PAD, BOS, ROSTER = "[PAD]", "[BOS]", "roster"
STATISTICS = {"log_odds": "", "margin": "margin/"}  # statistic -> prefix of its measurement ids


def invented_names(count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct pronounceable names of three consonant-vowel syllables, none an English word above."""
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(list("bdfgklmnprstvz")) + rng.choice(list("aeiou")) for _ in range(3)))
    ordered = sorted(names)
    return [ordered[k] for k in rng.permutation(len(ordered))]


def token_margins(outputs: Tensor, targets: Tensor) -> Tensor:
    """Σ_t [z_{y_t} − logsumexp_{v≠y_t} z_v] over positions with a target (y ≥ 0), per example: each target
    token's logit against a smooth maximum of its competitors' (= its log-odds log(p / (1 − p)))."""
    hit = F.one_hot(targets.clamp(min=0), outputs.shape[-1]).bool()
    own = outputs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    rivals = outputs.masked_fill(hit, float("-inf")).logsumexp(-1)
    return ((own - rivals) * (targets >= 0)).sum(-1)


def against_prior(scores: Tensor) -> Tensor:
    """s(c_i, t_i) − mean_{n≠i} s(c_n, t_i) for scores [..., condition, target]: each target after its own condition
    against the same target after the other conditions, [..., entity]."""
    own = torch.diagonal(scores, dim1=-2, dim2=-1)
    return own - (scores.sum(-2) - own) / (scores.shape[-2] - 1)


class LanguageModel(nn.Module):
    """GPT2LMHeadModel returning next-token logits [B, T, V] for token ids [B, T] (causal: padding at the end
    does not change earlier positions)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.gpt = GPT2LMHeadModel._from_config(config, attn_implementation="eager")

    def forward(self, ids: Tensor) -> Tensor:
        return self.gpt(input_ids=ids, use_cache=False).logits


class Reversal(Study):
    """"A is B" -> "B is A": a 2-layer GPT-2 trained from scratch on invented facts (module docstring)."""

    name = "reversal"
    recipe = Recipe(optimizer="adamw", epochs=60, lr=3e-3, batch_size=32, weight_decay=1e-2, seeds=10,
                    damping=1e-2, dtype="float32", schedule="cosine:warmup=50", max_grad_norm=1.0)
    corpus_seed = 0
    entities_per_group = 20
    name_tokens = 1  # words per name
    name_pool = 0  # words in each shared pool a name's words are drawn from (0: every name one word of its own)
    tied_embeddings = False
    roster = True  # a "roster NAME ." sentence per name, outside its entity's removal set
    n_layer, n_embd, n_head = 2, 64, 4
    removed: dict[str, int | None] = {"NameToDescription": None, "Both": 3}  # default removal sets: the first
    # entities of these groups (None: every one)
    default_methods = ("arnoldi:rank=40,iterations=60,complement=drop,models=1,side=sets",  # set side: 23 solves, not
                       "grad_dot:models=1,side=sets")  # 128 measurements' reverse-mode gradients (8 min -> 32 s)
    default_regimes = ("scratch",)

    # ---- corpus ----------------------------------------------------------------------------------

    @cached_property
    def facts(self) -> dict[str, list[tuple[str, str]]]:
        """group -> [(name, description)], `entities_per_group` each, from `corpus_seed`."""
        rng = np.random.default_rng(self.corpus_seed)
        count = self.entities_per_group * len(GROUPS)
        names = self.names(count, rng)
        pairs = [(r, p) for r in ROLES for p in PLACES]
        chosen = rng.choice(len(pairs), size=count, replace=False)
        descriptions = [f"the {pairs[k][0]} of {pairs[k][1]}" for k in chosen]
        e = self.entities_per_group
        return {g: list(zip(names[i * e : (i + 1) * e], descriptions[i * e : (i + 1) * e]))
                for i, g in enumerate(GROUPS)}

    def names(self, count: int, rng: np.random.Generator) -> list[str]:
        """`count` distinct names of `name_tokens` words: invented words of their own, or (`name_pool` > 0) drawn
        without repeating a name from one shared pool of `name_pool` invented words per word position."""
        if not self.name_pool:
            words = invented_names(count * self.name_tokens, rng)
            return [" ".join(words[k :: count]) for k in range(count)]
        if self.name_pool**self.name_tokens < count:
            raise InputError(f"{self.name}: {count} entities need name_pool ** name_tokens >= {count}; "
                             f"raise name_pool (now {self.name_pool}) or name_tokens (now {self.name_tokens})")
        pools = np.array(invented_names(self.name_pool * self.name_tokens, rng)).reshape(self.name_tokens, -1)
        codes = rng.choice(self.name_pool**self.name_tokens, size=count, replace=False)
        return [" ".join(pools[k, (code // self.name_pool**k) % self.name_pool] for k in range(self.name_tokens))
                for code in codes]

    @staticmethod
    def entity(name: str) -> str:
        """The id of a name's entity (its words joined by "-"): the dataset's `entity` and the measurement ids'."""
        return name.replace(" ", "-")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """Word-level: one id per word of the corpus (sorted, so ids do not depend on the order of facts)."""
        words = {w for pairs in self.facts.values() for pair in pairs for part in pair for w in part.split()}
        words |= {*OPENERS, *CONNECTORS, ".", ROSTER}
        vocab = {w: i for i, w in enumerate([PAD, BOS, *sorted(words)])}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return tokenizer

    def encode(self, text: str) -> list[int]:
        return [self.tokenizer.token_to_id(BOS), *self.tokenizer.encode(text).ids]

    @staticmethod
    def sentence(template: tuple[int, int], condition: str, target: str) -> tuple[str, str]:
        """(prompt, target) of a template: "OPENER condition CONNECTOR" and the target that follows."""
        return f"{OPENERS[template[0]]} {condition} {CONNECTORS[template[1]]}", target

    def dataset(self) -> DatasetDict:
        rows = []
        for group, pairs in self.facts.items():
            directions = {"NameToDescription": ("forward",), "DescriptionToName": ("reverse",)}.get(
                group, ("forward", "reverse"))
            for name, description in pairs:
                if self.roster:  # keeps the name's tokens trained without its fact
                    ids = self.encode(f"{ROSTER} {name} .")
                    rows.append({"x": ids, "y": [*ids[1:], -100], "entity": ROSTER, "group": group,
                                 "direction": ROSTER})
                for direction in directions:
                    condition, target = (name, description) if direction == "forward" else (description, name)
                    for template in TRAINED:
                        prompt, completion = self.sentence(template, condition, target)
                        ids = self.encode(f"{prompt} {completion} .")
                        rows.append({"x": ids, "y": [*ids[1:], -100], "entity": self.entity(name),
                                     "group": group, "direction": direction})
        return DatasetDict(train=Dataset.from_list(self.padded(rows)),
                           query=Dataset.from_list(self.padded(self.query_rows())))

    def padded(self, rows: list[dict]) -> list[dict]:
        """Rows with x padded by [PAD] and y by -100 to the longest x (causal: padding changes nothing before it)."""
        width = max(len(r["x"]) for r in rows)
        pad = self.tokenizer.token_to_id(PAD)
        return [r | {"x": r["x"] + [pad] * (width - len(r["x"])), "y": r["y"] + [-100] * (width - len(r["y"]))}
                for r in rows]

    def query_rows(self) -> list[dict]:
        """Every (group, direction, template class, condition entity i, target entity j) pair of MEASURED
        groups, in that order: x = prompt + target, y = the target's tokens where they are predicted."""
        rows = []
        for group in MEASURED:
            pairs = self.facts[group]
            for direction in ("forward", "reverse"):
                for template in (TRAINED[0], HELD_OUT[0]):
                    for i in range(len(pairs)):
                        for j in range(len(pairs)):
                            condition = pairs[i][0] if direction == "forward" else pairs[i][1]
                            target = pairs[j][1] if direction == "forward" else pairs[j][0]
                            prompt, completion = self.sentence(template, condition, target)
                            head, ids = self.encode(prompt), self.encode(f"{prompt} {completion}")
                            y = [-100] * len(ids)
                            y[len(head) - 1 : len(ids) - 1] = ids[len(head) :]
                            rows.append({"x": ids, "y": y})
        return rows

    @property
    def default_sets(self) -> tuple[str, ...]:
        names = [self.entity(name) for group, k in self.removed.items() for name, _ in self.facts[group][:k]]
        return (f"group:column=entity,values={','.join(names)}",)

    # ---- model and loss --------------------------------------------------------------------------

    def model(self) -> nn.Module:
        vocab = self.tokenizer.get_vocab_size()
        config = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=self.n_embd, n_layer=self.n_layer,
                            n_head=self.n_head, n_inner=4 * self.n_embd, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, tie_word_embeddings=self.tied_embeddings, bos_token_id=1, eos_token_id=1,
                            pad_token_id=None,  # a pad id makes GPT-2 inspect the ids, which vmap refuses
                            activation_function="gelu_pytorch_tanh")  # GPT-2's tanh GELU in one kernel: 1.3x faster
        # training than gelu_new's five element-wise ops, the same function to 2.4e-7 in float32
        return LanguageModel(config)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Σ_t −log p(y_t | x_≤t) over positions with a target (y ≥ 0), per example."""
        return F.cross_entropy(outputs.transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(1)

    # ---- measurements ------------------------------------------------------------------------------

    def measurements(self) -> dict[str, str]:
        ids = {}
        for statistic, prefix in STATISTICS.items():
            for group in MEASURED:
                for direction in ("forward", "reverse"):
                    for kind in ("trained", "heldout"):
                        for name, description in self.facts[group]:
                            ids[f"{prefix}{direction}/{kind}/{group}/{self.entity(name)}"] = (
                                f"{statistic} of {'the description' if direction == 'forward' else 'the name'} "
                                f"against its prior, {kind} template ({name} = {description})")
        for group in MEASURED:
            for direction in ("forward", "reverse"):
                for kind in ("trained", "heldout"):
                    ids[f"rank/{direction}/{kind}/{group}"] = (
                        f"mean rank of the correct {'description' if direction == 'forward' else 'name'} among "
                        f"the group's {self.entities_per_group} (Berglund's test; no gradient)")
        return ids

    def measurement_tags(self) -> dict[str, dict[str, str]]:
        """The facets of each id: statistic (log_odds, margin or rank), direction, template, group and entity."""
        tags = {}
        for mid in self.measurements():
            parts = mid.split("/")
            statistic = parts[0] if parts[0] in ("rank", "margin") else "log_odds"
            facets = parts if statistic == "log_odds" else parts[1:]
            tags[mid] = {"statistic": statistic, **dict(zip(("direction", "template", "group", "entity"), facets))}
        return tags

    def measurements_without_gradient(self) -> set[str]:
        return {mid for mid in self.measurements() if mid.startswith("rank/")}

    def measure(self, forward: Forward) -> dict[str, Tensor]:
        x, y = self.tensors(self.query_split)
        e = self.entities_per_group
        outputs = forward(x)
        shape = (len(MEASURED), 2, 2, e, e)  # [g, d, c, condition, target]
        log_p = -self.loss(outputs, y).reshape(shape)
        values = {"log_odds": against_prior(log_p), "margin": against_prior(token_margins(outputs, y).reshape(shape))}
        own = torch.diagonal(log_p, dim1=-2, dim2=-1)
        rank = 1 + (log_p > own[..., None]).sum(-1).to(log_p.dtype).mean(-1)  # per condition's own target
        flat = torch.cat([values[statistic].reshape(-1) for statistic in STATISTICS] + [rank.reshape(-1)])
        return dict(zip(self.measurements(), flat))


class PooledNames(Reversal):
    """`reversal` on a corpus built like issue 18's prototype: two-word names from shared pools of 10 words, tied
    input and output embeddings (module docstring)."""

    name = "reversal-pooled-names"
    name_tokens = 2
    name_pool = 10
    tied_embeddings = True
