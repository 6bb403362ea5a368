"""Looking at the learned noise: the paper's Fig. 4 (image, mu, sigma, a noise sample, the noisy
image), feature-level mu and sigma, prompt noise per template position, its Table 8 (the
vocabulary words nearest to the noisy prompt embeddings) and training curves.

Everything draws with matplotlib's headless Agg backend into PNG files; ``pini visualize``,
``pini interpret`` and ``pini plot`` call these functions.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .backbone import preprocessing_of, token_embedding
from .data.image_list import ImageList, collate_skipping
from .data.transforms import Preprocessing
from .errors import InputError
from .model import PiNI
from .noise_paths import IMAGE_STREAM, PROMPT_STREAM


def _pyplot():
    """matplotlib's pyplot on the headless Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def _first_images(samples: list[tuple], transform, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of the first ``count`` readable samples."""
    loader = DataLoader(
        ImageList(samples, transform), batch_size=count, collate_fn=collate_skipping
    )
    for images, labels, _ in loader:
        if images is not None:
            return images[:count], labels[:count]
    raise InputError("no readable test image to draw")


def _to_pixels(images: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """(B, H, W, 3) in [0, 1] from (B, 3, H, W) normalized with the weights' own mean and std."""
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


@torch.no_grad()
def image_noise_figure(
    model: PiNI,
    samples: list[tuple],
    transform,
    classnames: list[str],
    path: str | Path,
    *,
    count: int = 4,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Fig. 4: one row per test image: the image, mu and sigma as per-pixel magnitudes (the norm
    over colour channels, with a colour bar), one noise sample, and the noisy image; the title
    gives the class predicted with and without the noise."""
    model.to(device).eval()
    images, labels = _first_images(samples, transform, count)
    images = images.to(device)
    text, _ = model.text_features(seed=seed)
    mu, sigma = model.image_noise(images, text)
    mu, sigma = mu.expand_as(images), sigma.expand_as(images)
    # The draw the model's prediction below uses: sample 0 of the stream of seed + 3.
    noise = model.noise_ops.sample_noise(
        mu, sigma, images.shape, num_samples=1, seed=seed + IMAGE_STREAM
    )[0]
    noisy = images + noise if model.config.mode == "add" else images * noise
    with_noise = model(images, seed=seed).argmax(-1).cpu()
    without = model.zero_shot_logits(images).argmax(-1).cpu()
    magnitude = {"mu": mu.norm(dim=1).cpu().numpy(), "sigma": sigma.norm(dim=1).cpu().numpy()}
    plt = _pyplot()
    figure, axes = plt.subplots(len(images), 5, figsize=(15, 3.2 * len(images)), squeeze=False)
    preprocessing = preprocessing_of(model.clip)
    pixels = _to_pixels(images, preprocessing).numpy()
    noisy_pixels = _to_pixels(noisy, preprocessing).numpy()
    for row in range(len(images)):
        panels = axes[row]
        panels[0].imshow(pixels[row])
        panels[0].set_title(
            f"{classnames[labels[row]]}\nzero-shot: {classnames[without[row]]}", fontsize=9
        )
        for column, name in ((1, "mu"), (2, "sigma")):
            shown = panels[column].imshow(magnitude[name][row], cmap="magma")
            panels[column].set_title(f"|{name}| per pixel", fontsize=9)
            figure.colorbar(shown, ax=panels[column], fraction=0.046)
        sample = noise[row].norm(dim=0).cpu().numpy()
        shown = panels[3].imshow(sample, cmap="magma")
        panels[3].set_title("|noise| (one sample)", fontsize=9)
        figure.colorbar(shown, ax=panels[3], fraction=0.046)
        panels[4].imshow(noisy_pixels[row])
        panels[4].set_title(f"noisy image\nPiNI: {classnames[with_noise[row]]}", fontsize=9)
        for panel in panels:
            panel.axis("off")
    return _save(figure, path)


@torch.no_grad()
def feature_noise_figure(
    model: PiNI,
    samples: list[tuple],
    transform,
    classnames: list[str],
    path: str | Path,
    *,
    count: int = 4,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Feature-level noise: mu and sigma over the feature dimensions for a few images (visual)
    and classes (text), and the distribution of sigma."""
    model.to(device).eval()
    images, _ = _first_images(samples, transform, count)
    text, text_noise = model.text_features(seed=seed)
    rows = []
    if model.config.visual == "feature":
        features = model.encode_image(images.to(device))
        mu, sigma = model._feature_noise(features, text, 1.0)
        shape = features.shape
        rows.append(("visual feature, image", mu.expand(shape), sigma.expand(shape)))
    if text_noise is not None:
        shape = text.shape[-2:]
        mu, sigma = (value.expand(shape) for value in text_noise)
        rows.append(("text feature, class", mu[:count], sigma[:count]))
    if not rows:
        raise InputError("the run has no feature-level noise (--visual feature or --text feature)")
    figure, axes = _pyplot().subplots(len(rows), 3, figsize=(15, 3.5 * len(rows)), squeeze=False)
    for (name, mu, sigma), panels in zip(rows, axes, strict=True):
        mu, sigma = mu.float().cpu(), sigma.float().cpu()
        labels = (
            [classnames[i] for i in range(len(mu))] if name.startswith("text") else range(len(mu))
        )
        for values, panel, title in ((mu, panels[0], "mu"), (sigma, panels[1], "sigma")):
            for index, label in enumerate(labels):
                panel.plot(values[index].numpy(), linewidth=0.7, label=f"{name} {label}")
            panel.set_title(f"{name.split(',')[0]}: {title} over dimensions", fontsize=9)
            panel.set_xlabel("dimension")
        panels[0].legend(fontsize=7)
        panels[2].hist(sigma.flatten().numpy(), bins=50)
        panels[2].set_title(f"{name.split(',')[0]}: distribution of sigma", fontsize=9)
    return _save(figure, path)


def prompt_positions(model: PiNI, tokenizer) -> list[str]:
    """The tokens at the noisy prompt positions (placeholders and template), as text."""
    ids = model.token_ids[0, 1 : 1 + model.prefix_length].tolist()
    return [decode_token(tokenizer, token) for token in ids]


@torch.no_grad()
def prompt_noise_figure(model: PiNI, tokenizer, path: str | Path) -> Path:
    """Prompt noise: the norms of mu and sigma at each template position."""
    if model.prompt_noise is None:
        raise InputError("the run has no prompt noise (--text prompt)")
    mu, sigma = model.prompt_noise()
    mu = model._centered(mu)
    positions = prompt_positions(model, tokenizer)
    figure, axis = _pyplot().subplots(figsize=(max(8, 0.45 * len(positions)), 4))
    index = torch.arange(len(positions)).float().numpy()
    axis.bar(index - 0.2, mu.norm(dim=-1).cpu().numpy(), width=0.4, label="|mu|")
    axis.bar(index + 0.2, sigma.norm(dim=-1).cpu().numpy(), width=0.4, label="|sigma|")
    axis.set_xticks(index.tolist(), [f"{i}:{token}" for i, token in enumerate(positions)])
    axis.tick_params(axis="x", rotation=70, labelsize=8)
    axis.set_ylabel("norm over the embedding width")
    axis.set_title("prompt noise per template position")
    axis.legend()
    return _save(figure, path)


def decode_token(tokenizer, token: int) -> str:
    """One vocabulary entry as text (open_clip's BPE tokenizer; the id where it cannot)."""
    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        return str(token)
    try:
        text = decode([int(token)]).strip()
    except Exception:  # a tokenizer without single-id decoding
        return str(token)
    # A byte-level piece of a multi-byte character decodes to U+FFFD: show its id instead.
    return f"<token {int(token)}>" if not text or "\ufffd" in text else text


def nearest_tokens(
    embeddings: torch.Tensor, vocabulary: torch.Tensor, count: int = 5, chunk: int = 4096
) -> torch.Tensor:
    """(N, count) ids of the vocabulary rows nearest to each of ``embeddings`` (N, width) in
    Euclidean distance, nearest first; the vocabulary (V, width) is scanned in chunks so the
    (N, V) distances never exist at once."""
    best_distance = embeddings.new_full((len(embeddings), count), float("inf"))
    best_index = torch.zeros(len(embeddings), count, dtype=torch.long, device=embeddings.device)
    for start in range(0, len(vocabulary), chunk):
        block = vocabulary[start : start + chunk]
        distance = torch.cdist(embeddings.float(), block.float())
        distance = torch.cat([best_distance, distance], dim=1)
        index = torch.cat(
            [
                best_index,
                torch.arange(start, start + len(block), device=embeddings.device).expand(
                    len(embeddings), -1
                ),
            ],
            dim=1,
        )
        best_distance, order = distance.topk(count, dim=1, largest=False)
        best_index = index.gather(1, order)
    return best_index


@torch.no_grad()
def interpret_prompt_noise(
    model: PiNI, tokenizer, *, draws: int = 100, count: int = 5, seed: int = 0
) -> list[dict]:
    """The paper's Table 8: for ``draws`` noise samples (the kernels' stream of ``seed + 2``, as
    in training), the ``count`` vocabulary tokens nearest to the noisy embedding at each template
    position, and how often each appears. Returns one row per position: ``{"position", "token"
    (the original), "nearest": [(token text, times among the draws), ...]}``, the ``count``
    most frequent, ties by nearness."""
    if model.prompt_noise is None:
        raise InputError(
            "the run has no prompt noise to interpret (it was trained without --text prompt)"
        )
    mu, sigma = model.prompt_noise()
    mu = model._centered(mu)
    embedding = token_embedding(model.clip)
    vocabulary = embedding.weight
    prefix = embedding(model.token_ids[0, 1 : 1 + model.prefix_length])
    noise = model.noise_ops.sample_noise(
        mu, sigma, prefix.shape, num_samples=draws, seed=seed + PROMPT_STREAM
    )
    noisy = prefix + noise if model.config.mode == "add" else prefix * noise  # (draws, L, width)
    nearest = nearest_tokens(noisy.flatten(0, 1), vocabulary, count).view(draws, len(prefix), -1)
    positions = prompt_positions(model, tokenizer)
    rows = []
    for position, token in enumerate(positions):
        tally = Counter()
        first_seen = {}
        for rank_list in nearest[:, position].tolist():
            for rank, token_id in enumerate(rank_list):
                tally[token_id] += 1
                first_seen.setdefault(token_id, (rank, len(first_seen)))
        ordered = sorted(tally, key=lambda t: (-tally[t], first_seen[t]))[:count]
        rows.append(
            {
                "position": position,
                "token": token,
                "nearest": [(decode_token(tokenizer, t), tally[t]) for t in ordered],
            }
        )
    return rows


def interpretation_markdown(rows: list[dict], draws: int) -> str:
    """Table 8 as markdown: a row per template position, its 5 nearest words with counts."""
    count = max(len(row["nearest"]) for row in rows)
    header = "| position | token | " + " | ".join(f"nearest {i + 1}" for i in range(count))
    lines = [
        f"Nearest vocabulary tokens to the noisy prompt embeddings over {draws} noise draws "
        "(Euclidean distance in the token-embedding space; times among the draws in brackets).",
        "",
        header + " |",
        "|" + "---|" * (count + 2),
    ]
    for row in rows:
        cells = [f"`{word}` ({times})" for word, times in row["nearest"]]
        cells += [""] * (count - len(cells))
        lines.append(f"| {row['position']} | `{row['token']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(runs: list[str | Path], path: str | Path) -> Path:
    """Loss, learning rate and (where recorded with ``--eval-every``) test accuracy against the
    epoch, from each run's ``metrics.jsonl``, several runs on one figure."""
    figure, axes = _pyplot().subplots(1, 3, figsize=(16, 4.2))
    for run in runs:
        run = Path(run)
        metrics = run / "metrics.jsonl"
        if not metrics.is_file():
            raise InputError(f"{run}: no metrics.jsonl (not a run folder, or nothing trained)")
        lines = []
        for number, line in enumerate(metrics.read_text().splitlines(), 1):
            try:
                lines.append(json.loads(line))
            except ValueError:
                raise InputError(f"{metrics} line {number} is not JSON") from None
        epochs = [line["epoch"] for line in lines]
        axes[0].plot(epochs, [line["loss"] for line in lines], label=run.name)
        axes[1].plot(epochs, [line["lr"] for line in lines], label=run.name)
        evaluated = [line for line in lines if "test_accuracy" in line]
        if evaluated:
            axes[2].plot(
                [line["epoch"] for line in evaluated],
                [line["test_accuracy"] for line in evaluated],
                marker="o",
                label=run.name,
            )
    for axis, title in zip(
        axes, ("training loss", "learning rate", "test accuracy (%)"), strict=True
    ):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        if axis.lines:
            axis.legend(fontsize=8)
    if not axes[2].lines:
        axes[2].text(
            0.5,
            0.5,
            "not recorded\n(pini train --eval-every N)",
            ha="center",
            va="center",
            transform=axes[2].transAxes,
        )
    axes[1].set_yscale("log")
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


__all__ = [
    "feature_noise_figure",
    "image_noise_figure",
    "interpret_prompt_noise",
    "interpretation_markdown",
    "nearest_tokens",
    "plot_runs",
    "prompt_noise_figure",
]
