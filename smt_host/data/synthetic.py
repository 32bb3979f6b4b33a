"""The built-in synthetic ads ecosystem: the default data, nothing downloaded.

One *world* holds users, ads and contexts shared by every surface (feed,
shop, video). Each impression's labels come from a known generator:

* click logit = surface bias + first-order effects (user segment, ad,
  advertiser, position) + 2nd-order terms (user x ad latent dot product,
  age x ad category, device x creative type) + a 3rd-order term
  (segment x ad category x hour bucket) + dense effects + noise;
* conversion and install happen only after a click, with a logit that shares
  the click's interaction terms (correlated tasks) plus terms of their own;
* on the surfaces with histories (feed, video) each impression carries the
  user's recent clicks, ``hist_ad_id`` (0 to :data:`HISTORY_MAX` ad ids,
  most recent first, a history of the ``ad_id`` table) and the same
  items' categories, ``hist_ad_category`` (of the ``ad_category`` table): each item's
  category is drawn from the user's latent taste (a softmax of the user's
  vector against category vectors) or, one time in three, from everywhere,
  and the ad uniformly within it. The planted signal: the click logit gains
  :data:`HISTORY_WEIGHT` (centred) when the candidate's category is the
  category of any of the history's :data:`HISTORY_RECENT` most recent
  items: it depends on the item most similar to the candidate, not on
  the history's average (a mean blurs a one-item match among up to 20,
  while attention to the items like the candidate finds it). The history
  is drawn per impression, so user_id and ad_id alone cannot explain it.

The bias of each event is solved so that positive rates are realistic
(clicks 2-6%, conversions and installs well under 1-2%). Everything is
deterministic per (seed, surface, sizes). A model's features are a subset of
the world's, so models see the same entities through different feature sets.

The train/valid/test splits share each label pattern in proportion to their
sizes (:func:`stratified_split`), so every split has the train base rate
and NE (divided by the train base rate's entropy) compares like with like.

Shapes: N examples, S sparse features, Nd dense features, T tasks.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs
import torch

from smt_host.data.batch import InMemorySource, Jagged, TensorSplit

if TYPE_CHECKING:  # pragma: no cover
    from smt_host.spec.schema import EcosystemSpec, ModelSpec

log = logging.getLogger("smt_host.data")

#: vocabulary of every sparse feature of the world
VOCAB: dict[str, int] = {
    "user_id": 20_000,
    "user_segment": 16,
    "age_bucket": 8,
    "gender": 3,
    "country": 24,
    "ad_id": 4_000,
    "advertiser_id": 400,
    "ad_category": 32,
    "creative_type": 6,
    "hour": 24,
    "device": 5,
    "position": 10,
}

DENSE: tuple[str, ...] = ("user_activity", "ad_hist_ctr", "price", "video_length", "recency")

EVENTS: tuple[str, ...] = ("click", "conversion", "install")

#: the world's histories: name -> the sparse feature whose ids (and table) it holds
HISTORIES: dict[str, str] = {"hist_ad_id": "ad_id", "hist_ad_category": "ad_category"}
#: the surfaces whose impressions carry histories
HISTORY_SURFACES: frozenset[str] = frozenset({"feed", "video"})
#: the longest history drawn (a spec's max_length below it truncates)
HISTORY_MAX = 30
#: the click logit's gain when the candidate's category is in the recent history
HISTORY_WEIGHT = 3.0
#: how many of the most recent items the planted match looks at
HISTORY_RECENT = 20


@attrs.frozen
class Surface:
    """Per-surface distributions and target rates."""

    name: str
    click_rate: float
    conversion_rate: float  # overall (click and conversion)
    install_rate: float
    mobile_share: float
    hour_peak: int


SURFACES: dict[str, Surface] = {
    "feed": Surface("feed", 0.035, 0.004, 0.002, 0.7, 20),
    "shop": Surface("shop", 0.05, 0.008, 0.001, 0.5, 13),
    "video": Surface("video", 0.025, 0.002, 0.006, 0.9, 22),
}


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


@attrs.frozen
class World:
    """The shared entities and the ground-truth effects (all tensors)."""

    user_attr: torch.Tensor  # (n_users, 4): segment, age, gender, country
    user_vec: torch.Tensor  # (n_users, k)
    user_activity: torch.Tensor  # (n_users,)
    ad_attr: torch.Tensor  # (n_ads, 3): advertiser, category, creative
    ad_vec: torch.Tensor  # (n_ads, k)
    ad_quality: torch.Tensor  # (n_ads,)
    ad_price: torch.Tensor  # (n_ads,)
    seg_w: torch.Tensor  # (16,)
    adv_w: torch.Tensor  # (400,)
    pos_w: torch.Tensor  # (10,)
    age_cat: torch.Tensor  # (8, 32)
    dev_creative: torch.Tensor  # (5, 6)
    seg_cat_hour: torch.Tensor  # (16, 32, 4)
    country_adv: torch.Tensor  # (24, 400) conversion-only 2nd order
    cat_conv: torch.Tensor  # (32,)
    cat_vec: torch.Tensor  # (32, k) category vectors of the users' taste (histories)


@functools.lru_cache(maxsize=4)
def make_world(seed: int) -> World:
    """The world of a seed (cached: every model of an ecosystem shares it)."""
    g = torch.Generator().manual_seed(_seed("world", seed))
    n_users, n_ads, k = VOCAB["user_id"], VOCAB["ad_id"], 8

    def randint(high: int, n: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=g)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    user_attr = torch.stack(
        [
            randint(VOCAB["user_segment"], n_users),
            randint(VOCAB["age_bucket"], n_users),
            randint(VOCAB["gender"], n_users),
            randint(VOCAB["country"], n_users),
        ],
        dim=1,
    )
    ad_attr = torch.stack(
        [
            randint(VOCAB["advertiser_id"], n_ads),
            randint(VOCAB["ad_category"], n_ads),
            randint(VOCAB["creative_type"], n_ads),
        ],
        dim=1,
    )
    return World(
        user_attr=user_attr,
        user_vec=randn(n_users, k) * 0.45,
        user_activity=torch.rand(n_users, generator=g),
        ad_attr=ad_attr,
        ad_vec=randn(n_ads, k) * 0.45,
        ad_quality=randn(n_ads) * 0.4,
        ad_price=torch.exp(randn(n_ads) * 0.8 + 3.0),
        seg_w=randn(VOCAB["user_segment"]) * 0.4,
        adv_w=randn(VOCAB["advertiser_id"]) * 0.3,
        pos_w=-torch.linspace(0, 1.2, VOCAB["position"]),
        age_cat=randn(VOCAB["age_bucket"], VOCAB["ad_category"]) * 0.7,
        dev_creative=randn(VOCAB["device"], VOCAB["creative_type"]) * 0.5,
        seg_cat_hour=randn(VOCAB["user_segment"], VOCAB["ad_category"], 4) * 0.9,
        country_adv=randn(VOCAB["country"], VOCAB["advertiser_id"]) * 0.6,
        cat_conv=randn(VOCAB["ad_category"]) * 0.5,
        cat_vec=randn(VOCAB["ad_category"], k),
    )


def _zipf(n: int, size: int, g: torch.Generator, s: float = 1.05) -> torch.Tensor:
    weights = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** s
    perm = torch.randperm(n, generator=g)
    return perm[torch.multinomial(weights, size, replacement=True, generator=g)]


def _solve_bias(logit: torch.Tensor, rate: float) -> float:
    """The bias b with mean(sigmoid(logit + b)) == rate (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if torch.sigmoid(logit + mid).mean().item() < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@attrs.frozen
class Impressions:
    """Every world column of N impressions of one surface."""

    sparse: Mapping[str, torch.Tensor]  # name -> (N,) int64
    dense: Mapping[str, torch.Tensor]  # name -> (N,) float32
    labels: Mapping[str, torch.Tensor]  # event -> (N,) float32
    #: history name -> (values (total,) int64, offsets (N + 1,) int64), most recent first
    histories: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = attrs.Factory(dict)


def draw_histories(
    w: World, users: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Click histories of N impressions: (values (total,), lengths (N,), categories (N, HISTORY_MAX)).

    Row i holds ``lengths[i]`` ad ids (uniform in 0..HISTORY_MAX), most
    recent first; ``categories[i, j]`` is the category of its j-th item (-1
    past its length). Each item's category comes from the user's taste,
    softmax(user_vec @ cat_vec^T * 2), or one time in three uniformly; its
    ad is uniform among the ads of that category.
    """
    n, m = len(users), HISTORY_MAX
    n_cat = VOCAB["ad_category"]
    taste = torch.softmax(2.0 * w.user_vec[users] @ w.cat_vec.t(), dim=1)  # (N, C)
    cdf = torch.cumsum(taste, dim=1)  # (N, C)
    u = torch.rand(n, m, generator=g) * cdf[:, -1:]  # (N, M)
    cats = torch.searchsorted(cdf, u).clamp(max=n_cat - 1)  # (N, M): inverse-CDF draws from the taste
    wander = torch.rand(n, m, generator=g) < 1 / 3
    cats = torch.where(wander, torch.randint(0, n_cat, (n, m), generator=g), cats)
    ad_cat = w.ad_attr[:, 1]  # (n_ads,)
    by_cat = torch.argsort(ad_cat, stable=True)  # ads grouped by category
    counts = torch.bincount(ad_cat, minlength=n_cat)  # (C,)
    starts = torch.cumsum(counts, 0) - counts
    pick = (torch.rand(n, m, generator=g) * counts[cats].clamp(min=1)).long()  # (N, M)
    ads = by_cat[(starts[cats] + pick).clamp(max=len(ad_cat) - 1)]  # (N, M)
    lengths = torch.randint(0, m + 1, (n,), generator=g)  # (N,)
    mask = torch.arange(m).unsqueeze(0) < lengths.unsqueeze(1)  # (N, M)
    cats_of = torch.where(mask, ad_cat[ads], torch.full_like(ads, -1))
    return ads[mask], lengths, cats_of


@functools.lru_cache(maxsize=16)
def make_impressions(seed: int, surface: str, n: int) -> Impressions:
    """N impressions of ``surface``, with all world features and all events.

    Deterministic per (seed, surface, n).
    """
    if surface not in SURFACES:
        raise ValueError(f"unknown surface {surface!r}; surfaces are: {', '.join(SURFACES)}")
    sf = SURFACES[surface]
    w = make_world(seed)
    g = torch.Generator().manual_seed(_seed("impressions", seed, surface, n))
    users = _zipf(VOCAB["user_id"], n, g)
    ads = _zipf(VOCAB["ad_id"], n, g, s=0.9)
    # hour peaks at the surface's peak hour; device skews mobile per surface
    hour = (sf.hour_peak + torch.round(torch.randn(n, generator=g) * 4)).long() % 24
    mobile = torch.rand(n, generator=g) < sf.mobile_share
    device = torch.where(mobile, torch.randint(0, 3, (n,), generator=g), torch.randint(3, 5, (n,), generator=g))
    # geometric-like: most impressions at the top positions
    position = torch.clamp((-torch.log(torch.rand(n, generator=g)) / 0.35).long(), max=VOCAB["position"] - 1)

    seg, age, gender, country = w.user_attr[users].unbind(1)
    adv, cat, creative = w.ad_attr[ads].unbind(1)
    hour_bucket = hour // 6

    activity = w.user_activity[users]
    noise = torch.randn(n, generator=g) * 0.3
    interaction = (
        (w.user_vec[users] * w.ad_vec[ads]).sum(1)
        + w.age_cat[age, cat]
        + w.dev_creative[device, creative]
        + w.seg_cat_hour[seg, cat, hour_bucket]
    )
    first = w.seg_w[seg] + w.adv_w[adv] + w.pos_w[position] + w.ad_quality[ads] + 0.8 * (activity - 0.5)
    click_logit = first + interaction + noise
    histories = {}
    if surface in HISTORY_SURFACES:
        values, lengths, hist_cats = draw_histories(w, users, g)
        recent = hist_cats[:, :HISTORY_RECENT]  # (N, K) categories of the most recent items
        match = (recent == cat.unsqueeze(1)).any(dim=1).float()  # (N,) the candidate's category is among them
        click_logit = click_logit + HISTORY_WEIGHT * (match - match.mean())
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        histories["hist_ad_id"] = (values.long(), offsets)
        histories["hist_ad_category"] = (w.ad_attr[values, 1].long(), offsets)  # the same items' categories
    click_logit = click_logit + _solve_bias(click_logit, sf.click_rate)
    click = torch.bernoulli(torch.sigmoid(click_logit), generator=g)

    price = w.ad_price[ads]
    post = 0.6 * interaction + w.country_adv[country, adv] + w.cat_conv[cat] - 0.3 * torch.log(price / 20)
    post = post + torch.randn(n, generator=g) * 0.3
    rates = {}
    for event, rate, extra in (
        ("conversion", sf.conversion_rate, torch.zeros(n)),
        ("install", sf.install_rate, 0.5 * (device < 3).float() + 0.4 * w.dev_creative[device, creative]),
    ):
        logit = post + extra
        # P(event) = P(click) * P(event | click): solve the conditional bias
        cond_rate = rate / max(click.mean().item(), 1e-6)
        logit = logit + _solve_bias(logit[click > 0] if click.sum() > 0 else logit, min(cond_rate, 0.9))
        rates[event] = click * torch.bernoulli(torch.sigmoid(logit), generator=g)

    # observable dense features: noisy views of the truth
    hist_ctr = torch.sigmoid(w.ad_quality[ads] + torch.randn(n, generator=g) * 0.5 - 3.0)
    dense = {
        "user_activity": activity + torch.randn(n, generator=g) * 0.1,
        "ad_hist_ctr": hist_ctr * 10,
        "price": torch.log1p(price),
        "video_length": torch.log1p(torch.exp(torch.randn(n, generator=g) + 3)),
        "recency": torch.rand(n, generator=g),
    }
    sparse = {
        "user_id": users,
        "user_segment": seg,
        "age_bucket": age,
        "gender": gender,
        "country": country,
        "ad_id": ads,
        "advertiser_id": adv,
        "ad_category": cat,
        "creative_type": creative,
        "hour": hour,
        "device": device,
        "position": position,
    }
    labels = {"click": click, **rates}
    return Impressions(
        sparse={k: v.long() for k, v in sparse.items()},
        dense={k: v.float() for k, v in dense.items()},
        labels={k: v.float() for k, v in labels.items()},
        histories=histories,
    )


def synthetic_source(model: ModelSpec, eco: EcosystemSpec) -> InMemorySource:
    """The synthetic data of one model: its surface's impressions, cut into
    train/valid/test with the same base rates (:func:`stratified_split`),
    restricted to the model's features and tasks."""
    surface = model.data.surface or model.surface
    path = f"$.models.{model.name}"
    if surface is None:
        raise ValueError(f"a synthetic model needs a surface ({', '.join(SURFACES)}) @ {path}.surface")
    s = eco.synthetic
    sizes = {"train": s.train_examples, "valid": s.valid_examples, "test": s.test_examples}
    total = sum(sizes.values())
    imp = make_impressions(s.seed, surface, total)
    for f in model.features.sparse:
        if f.name not in VOCAB:
            raise ValueError(
                f"synthetic data has no sparse feature {f.name!r}; it has: {', '.join(VOCAB)} @ {path}.features"
            )
        if f.vocab_size < VOCAB[f.name]:
            raise ValueError(
                f"vocab_size of {f.name!r} must be >= {VOCAB[f.name]} for synthetic data, got {f.vocab_size} @ {path}.features"
            )
    for f in model.features.dense:
        if f.name not in imp.dense:
            raise ValueError(
                f"synthetic data has no dense feature {f.name!r}; it has: {', '.join(DENSE)} @ {path}.features"
            )
    for i, h in enumerate(model.features.sequence):
        where = f"{path}.features.sequence[{i}]"
        if h.name not in HISTORIES:
            raise ValueError(f"synthetic data has no history {h.name!r}; it has: {', '.join(HISTORIES)} @ {where}.name")
        if h.name not in imp.histories:
            raise ValueError(
                f"synthetic surface {surface!r} has no histories; surfaces with {h.name!r}: "
                f"{', '.join(sorted(HISTORY_SURFACES))} @ {where}.name"
            )
        if h.candidate != HISTORIES[h.name]:
            raise ValueError(
                f"history {h.name!r} holds {HISTORIES[h.name]} ids: its candidate must be "
                f"{HISTORIES[h.name]!r}, got {h.candidate!r} @ {where}.candidate"
            )
    for t in model.tasks:
        if t.label_name not in imp.labels:
            raise ValueError(
                f"synthetic data has no event {t.label_name!r}; events: {', '.join(EVENTS)} @ {path}.tasks"
            )
    keys = tuple(f.name for f in model.features.sparse)
    ids = torch.stack([imp.sparse[k] for k in keys], dim=1)
    if model.features.dense:
        dense = torch.stack([imp.dense[f.name] for f in model.features.dense], dim=1)
    else:
        dense = torch.zeros(total, 0)
    labels = torch.stack([imp.labels[t.label_name] for t in model.tasks], dim=1)
    events = torch.stack([imp.labels[e] for e in EVENTS], dim=1)  # every model of the surface: the same cut
    histories = {h.name: _cut(*imp.histories[h.name], h.max_length) for h in model.features.sequence}
    keys = keys + tuple(histories)
    splits = {}
    for split, rows in zip(sizes, stratified_split(events, list(sizes.values()))):
        jagged = {name: _rows(j, rows) for name, j in histories.items()}
        splits[split] = TensorSplit(dense=dense[rows], ids=ids[rows], keys=keys, labels=labels[rows], jagged=jagged)
    source = InMemorySource(splits=splits, task_names=model.task_names)
    truncated = {name: n for name, (_, n) in histories.items() if n}
    if truncated:  # rows whose history was cut to max_length: by design (histories reach HISTORY_MAX)
        source.truncated = {"synthetic": truncated}
        cut = ", ".join(f"{n} of {name!r}" for name, n in truncated.items())
        log.info("synthetic %s: truncated histories to max_length (kept the most recent ids): %s", model.name, cut)
    return source


def _cut(values: torch.Tensor, offsets: torch.Tensor, max_length: int) -> tuple[Jagged, int]:
    """A most-recent-first jagged column cut to ``max_length`` per row, and
    how many rows were cut."""
    lengths = offsets[1:] - offsets[:-1]
    pos = torch.arange(len(values)) - torch.repeat_interleave(offsets[:-1], lengths)  # (total,)
    kept = torch.minimum(lengths, torch.tensor(max_length))
    new_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(kept, 0)])
    return Jagged(values[pos < max_length], new_offsets), int((lengths > max_length).sum())


def _rows(column: tuple[Jagged, int], rows: torch.Tensor) -> Jagged:
    values, lengths = column[0].take(rows)
    return Jagged(values, torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)]))


def stratified_split(labels: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """The rows of each split, every label pattern shared out in proportion to the sizes.

    A contiguous cut of one stream gives each split its own sampling noise in
    the base rate (0.59% installs in train, 0.65% in valid), and NE, which
    divides by the train base rate's entropy, then charges that gap to the
    model: predicting the valid split's own rate scores NE 1.08. Here the rows
    are grouped by their pattern of labels (stream order within a group) and
    dealt to the splits by one evenly interleaved sequence of split slots, so
    each split holds its share of every pattern to within one row: the base
    rates agree to within a row per split, and the sizes are exact.
    Deterministic: no random numbers.

    Args:
        labels: (N, E) 0/1 labels of the N rows (every event, not only a model's tasks).
        sizes: rows per split, summing to N.

    Returns:
        Per split, its row indices (ascending, ``sizes[i]`` of them).

    Example:
        >>> y = torch.tensor([[0.0], [1.0], [0.0], [0.0], [1.0], [0.0], [0.0], [0.0]])
        >>> [r.tolist() for r in stratified_split(y, [4, 4])]
        [[0, 1, 3, 6], [2, 4, 5, 7]]
    """
    n = labels.shape[0]
    if sum(sizes) != n:
        raise ValueError(f"split sizes {sizes} sum to {sum(sizes)}, not to the {n} rows")
    weights = 2 ** torch.arange(labels.shape[1])  # (E,)
    pattern = ((labels > 0.5).long() * weights).sum(1)  # (N,)
    by_pattern = torch.argsort(pattern, stable=True)  # (N,) rows grouped by pattern
    # slot j of split s sits at (j + 1/2) / size_s: every window of the sequence holds each split's share
    where = torch.cat([(torch.arange(size, dtype=torch.float64) + 0.5) / size for size in sizes])  # (N,)
    owner = torch.cat([torch.full((size,), i) for i, size in enumerate(sizes)])  # (N,)
    split_of = torch.empty(n, dtype=torch.long)
    split_of[by_pattern] = owner[torch.argsort(where, stable=True)]
    return [torch.nonzero(split_of == i).squeeze(1) for i in range(len(sizes))]
