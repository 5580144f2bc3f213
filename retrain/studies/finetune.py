"""`finetune`: a pretrained causal language model fine-tuned with `transformers.Trainer` on facts about invented
people, one removal group per person; the template a user copies to verify predictions about their own fine-tuning.

What a user changes: `pretrained` (any local folder or hub name that `from_pretrained` loads: a causal LM and its
tokenizer), the facts (`facts`, `dataset`), the measurements (`measure`) and `training_arguments`. What stays:
`train_model` hands the Trainer the job's kept examples and returns the fine-tuned `state_dict`; ifledger measures it.

The built-in model (used when `pretrained` is empty): a 2-layer GPT-2 (`GPT2Config`, d 64, tied embeddings, dropout
off) with a word-level vocabulary, pretrained with the same Trainer on sentences about other people, then written
with `save_pretrained` (model and tokenizer) to `$IFLEDGER_CACHE/finetune-pretrained-<content hash>` (default
`~/.cache/ifledger`): built once, reused, and loaded back with `AutoModelForCausalLM.from_pretrained`, the code path
of a hub model, offline. Its weights' sha256 is part of the study hash.

Corpus (no downloads): a person is a two-word name from two pools of invented words; each has a value of three
attributes (home, job, pet). A sentence is "OPENER NAME ATTRIBUTE CONNECTOR VALUE ." over the 3 × 3 (opener,
connector) templates. Pretraining people appear in all 9 templates, so the model learns that they are paraphrases;
fine-tuning people appear in the 6 with opener ≠ connector; the templates with opener = connector are held out.
Measurements: log_p/<person>/<attribute> = log p(VALUE | "fact NAME ATTRIBUTE is"), summed over VALUE's tokens, on
the held-out template (a paraphrase never fine-tuned). Removing a person's sentences (their group) should lower it.

Fine-tuning objective: the mean over a batch of each sentence's summed next-token NLL (`loss`, given to the Trainer
as `compute_loss_func`), the J of the influence formulas; AdamW, cosine decay with warmup, as `training_arguments`
maps the recipe. Pairing "dropped": the Trainer's data loader never sees the removed sentences, so a retraining's
batches differ from the full-data run's of the same seed (the paired difference carries that noise)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from retrain.options import option
from retrain.studies.reversal import invented_names
from retrain.study import Forward, Recipe, Study, params_sha256
from retrain.trainer import TrainingJob
from store.records import InputError, content_hash

OPENERS = ("fact", "note", "recall")
CONNECTORS = ("is", "was", "remains")
TRAINED = [(o, c) for o in range(3) for c in range(3) if o != c]
HELD_OUT = (0, 0)  # the template of the measurements: "fact NAME ATTRIBUTE is VALUE"
ATTRIBUTES = {"home": ("harbour", "valley", "tower", "forest", "desert", "island", "canyon", "meadow"),
              "job": ("keeper", "founder", "painter", "healer", "scribe", "builder", "singer", "pilot"),
              "pet": ("cat", "dog", "owl", "goat", "horse", "parrot", "rabbit", "turtle")}
POOL = 8  # invented words per name position: POOL² possible people
PRETRAINING_PEOPLE = 40
PAD, BOS, UNK = "[PAD]", "[BOS]", "[UNK]"
# the built-in model and its pretraining (change these to pretrain another one; the cache folder is content-named)
MODEL_CONFIG = dict(n_positions=16, n_embd=64, n_layer=2, n_head=4, n_inner=256, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, tie_word_embeddings=True, pad_token_id=None)  # no pad id: GPT-2 then never
# inspects the ids, which torch.func's transforms refuse
PRETRAINING = Recipe(optimizer="adamw", epochs=6, lr=3e-3, batch_size=32, weight_decay=1e-2, seeds=1,
                     dtype="float32", schedule="cosine:warmup=20", max_grad_norm=1.0)


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    pretrained: str = option("a local folder or hub name holding a causal LM and its tokenizer (from_pretrained); "
                             "empty: the built-in 2-layer GPT-2, pretrained once into $IFLEDGER_CACHE", "")
    people: int = option("people whose facts are fine-tuned (one removal group each)", 10, minimum=2,
                         maximum=POOL * POOL - PRETRAINING_PEOPLE)
    seeds: int = option("paired seeds (the recipe's)", 5, minimum=1)
    epochs: int = option("fine-tuning epochs (the recipe's)", 20, minimum=1)


class CausalLM(nn.Module):
    """A Hugging Face causal LM as the study's model: token ids [B, T] -> next-token logits [B, T, V]. The Trainer
    trains `lm` itself; the study's `state_dict` names are `lm.` + the Hugging Face names."""

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def sentence(template: tuple[int, int], name: str, attribute: str, value: str) -> tuple[str, str]:
    """(prompt, completion): "OPENER NAME ATTRIBUTE CONNECTOR" and " VALUE"."""
    return f"{OPENERS[template[0]]} {name} {attribute} {CONNECTORS[template[1]]}", f" {value}"


def run_trainer(lm: PreTrainedModel, train: Dataset, arguments: TrainingArguments) -> None:
    """Train `lm` in place with `transformers.Trainer` on `train` (columns input_ids, labels: next-token targets,
    -100 where none), minimising the mean over a batch of each sentence's summed NLL."""
    def mean_sentence_nll(outputs, labels: Tensor, num_items_in_batch=None) -> Tensor:
        return sentence_nll(outputs.logits, labels).mean()

    trainer = Trainer(model=lm, args=arguments, train_dataset=train, compute_loss_func=mean_sentence_nll)
    trainer.remove_callback(PrinterCallback)  # its closing line of metrics would land in ifledger's output
    trainer.train()


def sentence_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Σ_t −log p(y_t | x_≤t) over positions with a target (y ≥ 0), per sentence."""
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(1)


def training_arguments(recipe: Recipe, seed: int, epochs: int, out: Path, device: str) -> TrainingArguments:
    """The recipe as the Trainer's arguments: torch's AdamW (the Trainer exempts biases and LayerNorm weights from
    weight decay), the Trainer's cosine decay after the recipe's warmup steps (its warmup starts from 0, the engine's
    from 1/W), on the CPU unless `device` is cuda; seeded by `seed`; nothing reported, logged or saved (ifledger
    keeps the returned parameters)."""
    return TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, learning_rate=recipe.lr, weight_decay=recipe.weight_decay,
        per_device_train_batch_size=recipe.batch_size, dataloader_drop_last=recipe.drop_last, optim="adamw_torch",
        lr_scheduler_type="cosine", warmup_steps=recipe.make_schedule().options.warmup,
        max_grad_norm=recipe.max_grad_norm, seed=seed, data_seed=seed, use_cpu=not device.startswith("cuda"),
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)


def causal_rows(tokenizer: PreTrainedTokenizerFast, prompt: str, completion: str, whole: bool) -> dict:
    """x = BOS + prompt + completion token ids; y = the next token where it is predicted: every position
    (`whole`, a training sentence) or the completion's tokens only (a measurement)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    head = [bos, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    ids = [bos, *tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]]
    y = [*ids[1:], -100] if whole else [-100] * (len(head) - 1) + ids[len(head) :] + [-100]
    return {"x": ids, "y": y}


def padded(rows: list[dict], pad: int) -> list[dict]:
    """Rows with x padded by `pad` and y by -100 to the longest x (causal: padding changes nothing before it)."""
    width = max(len(r["x"]) for r in rows)
    return [r | {"x": r["x"] + [pad] * (width - len(r["x"])), "y": r["y"] + [-100] * (width - len(r["y"]))}
            for r in rows]


class Finetune(Study):
    """A pretrained GPT-2 fine-tuned with `transformers.Trainer` on facts about invented people; one removal group
    per person; log p of each fact on a held-out paraphrase (module docstring: the template to copy)."""

    name = "finetune"
    Options = FinetuneOptions
    pairing = "dropped"  # the Trainer's loader drops removed examples: batches differ from the full-data run's
    # set-side CG (one solve per chunk of sets: no per-example gradients kept), and TracIn's dot product as a baseline
    default_methods = ("cg:side=sets,iterations=20,models=1", "grad_dot:models=1")
    default_sets = ("group:column=person",)
    default_regimes = ("scratch",)

    @cached_property
    def recipe(self) -> Recipe:  # type: ignore[override]
        """Fine-tuning: AdamW, warmup and cosine decay, the options' seeds and epochs; `damping` λ for the
        estimators (they invert G + (wd + λ)I)."""
        return Recipe(optimizer="adamw", epochs=self.options.epochs, lr=3e-3, batch_size=16, weight_decay=1e-2,
                      seeds=self.options.seeds, damping=1e-2, dtype="float32", schedule="cosine:warmup=10",
                      max_grad_norm=1.0)

    # ---- the pretrained model (change `pretrained` to use your own) ----------------------------------------

    @cached_property
    def checkpoint(self) -> str:
        """What `from_pretrained` loads: the option, or the built-in model's cache folder (built once)."""
        return self.options.pretrained or str(pretrained_builtin())

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return AutoTokenizer.from_pretrained(self.checkpoint)

    def model(self) -> nn.Module:
        transformers.utils.logging.disable_progress_bar()  # else a bar per model loaded floods the output
        try:
            lm = AutoModelForCausalLM.from_pretrained(self.checkpoint, attn_implementation="eager",
                                                      dtype=getattr(torch, self.recipe.dtype))
        except OSError as e:
            raise InputError(f"{self.name}: pretrained={self.checkpoint} does not load with from_pretrained "
                             f"({str(e).splitlines()[0]}); give a local folder with a causal LM and its tokenizer, "
                             "or a hub name") from None
        return CausalLM(lm)

    # ---- data: one group of sentences per person ----------------------------------------------------------

    @cached_property
    def facts(self) -> dict[str, dict[str, str]]:
        """The fine-tuning people: name -> attribute -> value (`people` of them, after the pretraining ones)."""
        return dict(corpus()[PRETRAINING_PEOPLE : PRETRAINING_PEOPLE + self.options.people])

    def dataset(self) -> DatasetDict:
        rows, queries = [], []
        for name, values in self.facts.items():
            for attribute, value in values.items():
                for template in TRAINED:
                    row = causal_rows(self.tokenizer, *sentence(template, name, attribute, value + " ."), whole=True)
                    rows.append(row | {"person": self.person(name), "attribute": attribute})
                queries.append(causal_rows(self.tokenizer, *sentence(HELD_OUT, name, attribute, value), whole=False))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return DatasetDict(train=Dataset.from_list(padded(rows, pad)), query=Dataset.from_list(padded(queries, pad)))

    @staticmethod
    def person(name: str) -> str:
        """A person's id (their name's words joined by "-"): the `person` column and the measurement ids'."""
        return name.replace(" ", "-")

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return sentence_nll(outputs, targets)

    # ---- measurements ------------------------------------------------------------------------------------

    def measurements(self) -> dict[str, str]:
        return {f"log_p/{self.person(name)}/{attribute}": f"log p({value} | fact {name} {attribute} is), held out"
                for name, values in self.facts.items() for attribute, value in values.items()}

    def measurement_tags(self) -> dict[str, dict[str, str]]:
        return {mid: dict(zip(("statistic", "person", "attribute"), mid.split("/"))) for mid in self.measurements()}

    def measure(self, forward: Forward) -> dict[str, Tensor]:
        """log p(VALUE | held-out prompt), summed over VALUE's tokens, per (person, attribute)."""
        x, y = self.tensors(self.query_split)
        return dict(zip(self.measurements(), -self.loss(forward(x), y)))

    # ---- training: the Trainer, one model per job ----------------------------------------------------------

    def train_model(self, job: TrainingJob) -> dict[str, Tensor]:
        """Fine-tune from the pretrained model (`scratch`) or the full-data model (`warm`: `job.init`) on the kept
        sentences only, with the Trainer, for `job.epochs` epochs seeded by `job.seed`, on `job.device`; returns its
        state_dict."""
        if job.new_labels:
            raise ValueError("relabel sets are not defined for text; use removal sets")
        model = self.model()
        if job.init is not None:
            model.load_state_dict(torch.load(job.init, map_location="cpu", weights_only=True))
        kept = self.data["train"].select(job.kept).select_columns(["x", "y"])
        run_trainer(model.lm, kept.rename_columns({"x": "input_ids", "y": "labels"}),
                    training_arguments(self.recipe, job.seed, job.epochs, job.out, job.device))
        return model.state_dict()

    def config(self) -> dict:
        """The study's config and the pretrained weights' sha256 (a model from another folder is another study)."""
        return super().config() | {"pretrained_sha256": params_sha256(self.init_params(0))}


# ---- the built-in pretrained model ------------------------------------------------------------------------------


def corpus() -> list[tuple[str, dict[str, str]]]:
    """Every possible person (name, attribute -> value), in a fixed random order from seed 0: the first
    PRETRAINING_PEOPLE are pretrained on, the next `people` fine-tuned on. A name is two invented words, one from
    each of two pools of POOL."""
    rng = np.random.default_rng(0)
    pools = np.array(invented_names(2 * POOL, rng)).reshape(2, POOL)
    return [(f"{pools[0, c // POOL]} {pools[1, c % POOL]}",
             {a: str(rng.choice(values)) for a, values in ATTRIBUTES.items()}) for c in rng.permutation(POOL * POOL)]


def pretraining_sentences() -> list[str]:
    """Every template (held-out ones too: pretraining teaches that they are paraphrases) for the pretraining
    people."""
    return ["".join(sentence((o, c), name, a, v + " .")) for name, values in corpus()[:PRETRAINING_PEOPLE]
            for a, v in values.items() for o in range(3) for c in range(3)]


def builtin_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: every word any person's sentences use (fine-tuning people's names are pretraining words)."""
    words = {w for name, _ in corpus() for w in name.split()} | {v for vs in ATTRIBUTES.values() for v in vs}
    words |= {*OPENERS, *CONNECTORS, *ATTRIBUTES, "."}
    vocab = {w: i for i, w in enumerate([PAD, BOS, UNK, *sorted(words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=BOS, pad_token=PAD,
                                   unk_token=UNK)


def pretrained_builtin() -> Path:
    """The built-in pretrained model's folder, `$IFLEDGER_CACHE/finetune-pretrained-<hash>`: pretrained and saved
    with `save_pretrained` on first use (into a temporary folder renamed into place, so concurrent processes agree
    on one), then reused. The hash covers the corpus, the vocabulary, the model config, the pretraining recipe and
    the library versions."""
    tokenizer = builtin_tokenizer()
    sentences = pretraining_sentences()
    config = MODEL_CONFIG | {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                             "eos_token_id": tokenizer.eos_token_id}
    root = Path(os.environ.get("IFLEDGER_CACHE", "~/.cache/ifledger")).expanduser()
    key = content_hash(sentences, tokenizer.get_vocab(), config, PRETRAINING.config(), transformers.__version__,
                       torch.__version__)
    folder = root / f"finetune-pretrained-{key}"
    if (folder / "config.json").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".building-") as building:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            lm = GPT2LMHeadModel(GPT2Config(**config))
        rows = [causal_rows(tokenizer, text, "", whole=True) for text in sentences]
        train = Dataset.from_list(padded(rows, tokenizer.pad_token_id))
        run_trainer(lm, train.rename_columns({"x": "input_ids", "y": "labels"}),
                    training_arguments(PRETRAINING, 0, PRETRAINING.epochs, Path(building) / "trainer", "cpu"))
        staged = Path(building) / "model"
        lm.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        try:
            staged.rename(folder)
        except OSError:  # another process put it in place first: use that one
            if not (folder / "config.json").exists():
                raise
    return folder
