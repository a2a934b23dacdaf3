"""Seeded synthetic e-commerce data (users, items, sessions) and the feature pipeline of the RecServe examples."""

# Import it from the examples: `sys.path.insert(0, "<repo>/examples")` then `import ecommerce_data`, or run
# `python examples/ecommerce_data.py --users 2000` for a summary of a generated data set.

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

DEVICES = ("mobile", "desktop", "tablet")
BRAND_BUCKETS = 8  # brands are hashed into a few buckets: the serving input stays fixed-size as the catalogue grows
# Knuth's multiplicative hash: a stable brand -> bucket mapping that does not depend on Python's salted hash().
_HASH_MULT = 2654435761


@dataclass(frozen=True)
class DataConfig:
    """Sizes and seed of a generated data set; the defaults train the CTR example in seconds."""

    n_users: int = 2000
    n_items: int = 1000
    n_categories: int = 12
    n_brands: int = 60
    days: int = 28
    history_days: int = 14  # sessions before this day only build user/item profiles (no labels from them)
    test_days: int = 4  # the last days are the held-out split (a time split, as in production)
    sessions_per_week: float = 3.0  # mean over users; each user's activity level scales it
    views_per_session: float = 12.0
    seed: int = 0


@dataclass(frozen=True)
class Users:
    """Latent preferences (never shown to the models) of every user."""

    category_affinity: np.ndarray  # (U, C)
    brand_affinity: np.ndarray  # (U, B)
    price_sensitivity: np.ndarray  # (U,) > 0; multiplies how much a pricier-than-usual item hurts
    activity: np.ndarray  # (U,) sessions per week
    device_pref: np.ndarray  # (U, 3) probabilities over DEVICES
    peak_hour: np.ndarray  # (U,) hour of day the user mostly shops


@dataclass(frozen=True)
class Items:
    """The catalogue: every item's category, brand, price and (latent) appeal."""

    category: np.ndarray  # (I,) int
    brand: np.ndarray  # (I,) int
    price: np.ndarray  # (I,) float, currency units
    popularity: np.ndarray  # (I,) latent appeal, standard normal
    rel_log_price: np.ndarray  # (I,) log(price / median price of the item's category)


@dataclass(frozen=True)
class Events:
    """One row per item view; click, add-to-cart and purchase are nested funnels of the view."""

    user: np.ndarray
    item: np.ndarray
    session: np.ndarray
    day: np.ndarray
    hour: np.ndarray
    device: np.ndarray
    click: np.ndarray
    cart: np.ndarray
    purchase: np.ndarray

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def select(self, mask: np.ndarray) -> Events:
        return Events(**{k: v[mask] for k, v in asdict_shallow(self).items()})


def asdict_shallow(obj: object) -> dict[str, np.ndarray]:
    """dataclasses.asdict deep-copies numpy arrays; this only lists the fields."""
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}  # type: ignore[attr-defined]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def context_effect(hour: np.ndarray, device: np.ndarray) -> np.ndarray:
    """Evening sessions click more, mobile sessions less (small screens), tablets a little more."""
    device_effect = np.array([-0.25, 0.0, 0.15])[device]
    return 0.3 * np.cos(2 * np.pi * (hour - 20) / 24) + device_effect


def click_logit(users: Users, items: Items, user: np.ndarray, item: np.ndarray, *, hour: np.ndarray,
                device: np.ndarray) -> np.ndarray:
    """The ground-truth click model: a logistic model of user x item affinity plus context."""
    # Mobile shoppers are more price-sensitive (they compare prices in other apps).
    price_weight = users.price_sensitivity[user] * np.where(device == 0, 1.3, 1.0)
    return (
        -3.2
        + 1.1 * users.category_affinity[user, items.category[item]]
        + 0.9 * users.brand_affinity[user, items.brand[item]]
        - 0.9 * price_weight * items.rel_log_price[item]
        + 0.5 * items.popularity[item]
        + context_effect(hour, device)
    )


def _make_users(cfg: DataConfig, rng: np.random.Generator) -> Users:
    u, c, b = cfg.n_users, cfg.n_categories, cfg.n_brands
    cat = rng.normal(-0.5, 0.5, size=(u, c))
    # Every user loves two or three categories: most of the signal a model can find.
    for k in range(3):
        fav = rng.integers(0, c, size=u)
        boost = 2.0 if k < 2 else np.where(rng.random(u) < 0.5, 1.5, 0.0)
        cat[np.arange(u), fav] += boost
    brand = rng.normal(0.0, 0.4, size=(u, b))
    for _ in range(3):
        brand[np.arange(u), rng.integers(0, b, size=u)] += 1.5
    return Users(
        category_affinity=cat,
        brand_affinity=brand,
        price_sensitivity=rng.lognormal(0.0, 0.5, size=u),
        activity=rng.gamma(2.0, cfg.sessions_per_week / 2.0, size=u),
        device_pref=rng.dirichlet([2.0, 1.5, 0.5], size=u),
        peak_hour=rng.integers(0, 24, size=u),
    )


def _make_items(cfg: DataConfig, rng: np.random.Generator) -> Items:
    c, b = cfg.n_categories, cfg.n_brands
    # Category sizes follow a Zipf-like law, as in real catalogues.
    cat_weight = 1.0 / np.arange(1, c + 1) ** 0.8
    category = rng.choice(c, size=cfg.n_items, p=cat_weight / cat_weight.sum())
    # Brands belong to one category each; the first c brands guarantee every category has one.
    brand_category = np.concatenate([np.arange(min(b, c)), rng.integers(0, c, size=max(0, b - c))])
    brand = np.empty(cfg.n_items, dtype=np.int64)
    for cat_id in range(c):
        idx = np.flatnonzero(category == cat_id)
        choices = np.flatnonzero(brand_category == cat_id)
        if choices.size == 0:  # more categories than brands: borrow any brand
            choices = np.arange(b)
        brand[idx] = rng.choice(choices, size=idx.size)
    cat_base = rng.lognormal(3.5, 0.8, size=c)
    brand_premium = rng.lognormal(0.0, 0.3, size=b)
    price = np.round(cat_base[category] * brand_premium[brand] * rng.lognormal(0.0, 0.4, size=cfg.n_items), 2)
    price = np.maximum(price, 0.99)
    log_price = np.log(price)
    cat_median = np.array([np.median(log_price[category == k]) if np.any(category == k) else 0.0 for k in range(c)])
    return Items(
        category=category,
        brand=brand,
        price=price,
        popularity=rng.normal(0.0, 1.0, size=cfg.n_items),
        rel_log_price=log_price - cat_median[category],
    )


def _sample_exposures(cfg: DataConfig, users: Users, items: Items, view_user: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """Which item each view shows: half from popularity, half from a (previous) recommender that knows the user."""
    n = view_user.size
    pop_w = np.exp(0.8 * items.popularity)
    item = rng.choice(cfg.n_items, size=n, p=pop_w / pop_w.sum())
    personal = rng.random(n) < 0.5
    # Gumbel-max draws a category per view from softmax(category affinity) without a per-row loop.
    gumbel = rng.gumbel(size=(int(personal.sum()), cfg.n_categories))
    cat = np.argmax(users.category_affinity[view_user[personal]] + gumbel, axis=1)
    chosen = np.empty(cat.size, dtype=np.int64)
    for k in range(cfg.n_categories):
        rows = np.flatnonzero(cat == k)
        pool = np.flatnonzero(items.category == k)
        if pool.size == 0:
            pool = np.arange(cfg.n_items)
        w = pop_w[pool]
        chosen[rows] = pool[rng.choice(pool.size, size=rows.size, p=w / w.sum())]
    item[personal] = chosen
    return item


def _make_events(cfg: DataConfig, users: Users, items: Items, rng: np.random.Generator) -> Events:
    n_sessions = rng.poisson(users.activity * cfg.days / 7.0)
    s_user = np.repeat(np.arange(cfg.n_users), n_sessions)
    n_s = s_user.size
    s_day = rng.integers(0, cfg.days, size=n_s)
    s_hour = (users.peak_hour[s_user] + np.rint(rng.normal(0.0, 3.0, size=n_s)).astype(np.int64)) % 24
    # Per-session device drawn from the user's device preference (inverse-CDF on cumulative probabilities).
    cdf = np.cumsum(users.device_pref[s_user], axis=1)
    s_device = np.minimum((rng.random((n_s, 1)) > cdf).sum(axis=1), len(DEVICES) - 1)
    # Sessions are ordered by (day, user) so a time split is a prefix/suffix split.
    order = np.lexsort((s_user, s_day))
    s_user, s_day, s_hour, s_device = s_user[order], s_day[order], s_hour[order], s_device[order]
    n_views = 1 + rng.poisson(cfg.views_per_session - 1, size=n_s)
    session = np.repeat(np.arange(n_s), n_views)
    user = s_user[session]
    hour, device = s_hour[session], s_device[session]
    item = _sample_exposures(cfg, users, items, user, rng)
    logit = click_logit(users, items, user, item, hour=hour, device=device)
    click = rng.random(user.size) < _sigmoid(logit)
    cart_logit = (-1.6 + 0.5 * users.category_affinity[user, items.category[item]]
                  - 1.0 * users.price_sensitivity[user] * items.rel_log_price[item] + 0.3 * items.popularity[item])
    cart = click & (rng.random(user.size) < _sigmoid(cart_logit))
    buy_logit = (-0.2 + 0.5 * users.brand_affinity[user, items.brand[item]]
                 - 0.8 * users.price_sensitivity[user] * items.rel_log_price[item])
    purchase = cart & (rng.random(user.size) < _sigmoid(buy_logit))
    return Events(user=user, item=item, session=session, day=s_day[session], hour=hour, device=device,
                  click=click, cart=cart, purchase=purchase)


@dataclass(frozen=True)
class EcommerceData:
    """A generated data set: config, latent users, catalogue and the event log."""

    config: DataConfig
    users: Users
    items: Items
    events: Events

    @cached_property
    def features(self) -> FeaturePipeline:
        return FeaturePipeline.fit(self)

    def summary(self) -> dict[str, float | int]:
        ev = self.events
        return {
            "users": self.config.n_users,
            "items": self.config.n_items,
            "sessions": int(ev.session.max() + 1) if len(ev) else 0,
            "views": len(ev),
            "click_rate": float(ev.click.mean()),
            "cart_rate": float(ev.cart.mean()),
            "purchase_rate": float(ev.purchase.mean()),
            "feature_dim": self.features.dim,
        }


def generate(config: DataConfig | None = None) -> EcommerceData:
    """Generate users, items and sessions; the same config (seed included) gives identical data."""
    cfg = config or DataConfig()
    if not 0 < cfg.history_days < cfg.days - cfg.test_days:
        raise ValueError("need 0 < history_days < days - test_days")
    rng = np.random.default_rng(cfg.seed)
    users = _make_users(cfg, rng)
    items = _make_items(cfg, rng)
    events = _make_events(cfg, users, items, rng)
    return EcommerceData(cfg, users, items, events)


@dataclass(frozen=True)
class Split:
    """Feature matrix and labels of the labelled (post-history) views of one split."""

    x: np.ndarray  # (N, D) float32
    click: np.ndarray  # (N,) float32 in {0, 1}
    purchase: np.ndarray  # (N,) float32 in {0, 1}
    user: np.ndarray
    item: np.ndarray

    def label(self, name: str) -> np.ndarray:
        if name not in ("click", "purchase"):
            raise ValueError(f"unknown label {name!r}: click or purchase")
        return self.click if name == "click" else self.purchase


@dataclass
class FeaturePipeline:
    """User/item profiles computed from the history days only, and the float32 feature builders that use them.

    Model input = [user features | item features | context features | cross features], all bounded floats.
    """

    n_categories: int
    n_brands: int
    data: EcommerceData = field(repr=False)
    user_block: np.ndarray = field(repr=False)  # (U, Du)
    item_block: np.ndarray = field(repr=False)  # (I, Di)
    user_cat_share: np.ndarray = field(repr=False)  # (U, C)
    user_brand_share: np.ndarray = field(repr=False)  # (U, B)
    user_price_tolerance: np.ndarray = field(repr=False)  # (U,)

    @classmethod
    def fit(cls, data: EcommerceData) -> FeaturePipeline:
        cfg, items = data.config, data.items
        hist = data.events.select(data.events.day < cfg.history_days)
        u, c, b, n_i = cfg.n_users, cfg.n_categories, cfg.n_brands, cfg.n_items
        h_cat, h_brand = items.category[hist.item], items.brand[hist.item]
        w = hist.click.astype(np.float64) + 0.1  # clicks dominate; views (exposure) add a weak prior
        cat_counts = np.zeros((u, c))
        np.add.at(cat_counts, (hist.user, h_cat), w)
        brand_counts = np.zeros((u, b))
        np.add.at(brand_counts, (hist.user, h_brand), hist.click.astype(np.float64))
        global_cat = cat_counts.sum(0) / max(cat_counts.sum(), 1e-9)
        # Additive smoothing towards the global mix: users with little history fall back to the average.
        cat_share = (cat_counts + 2.0 * global_cat) / (cat_counts.sum(1, keepdims=True) + 2.0)
        brand_share = brand_counts / (brand_counts.sum(1, keepdims=True) + 2.0)
        views = np.bincount(hist.user, minlength=u).astype(np.float64)
        clicks = np.bincount(hist.user, weights=hist.click, minlength=u)
        purchases = np.bincount(hist.user, weights=hist.purchase, minlength=u)
        _, first_view = np.unique(hist.session, return_index=True)
        sessions = np.bincount(hist.user[first_view], minlength=u).astype(np.float64)
        mobile = np.bincount(hist.user, weights=hist.device == 0, minlength=u)
        global_ctr = float(hist.click.mean()) if len(hist) else 0.1
        user_ctr = (clicks + 10 * global_ctr) / (views + 10)
        # Price tolerance: how much pricier (vs category median) the items a user clicks are than the ones shown.
        rel = items.rel_log_price[hist.item]
        clicked_rel = np.bincount(hist.user, weights=rel * hist.click, minlength=u) / (clicks + 1.0)
        shown_rel = np.bincount(hist.user, weights=rel, minlength=u) / (views + 1.0)
        tolerance = np.clip(clicked_rel - shown_rel, -1.5, 1.5)
        user_block = np.column_stack([
            cat_share,
            np.log1p(sessions) / 4.0,
            np.log1p(views) / 7.0,
            user_ctr * 5.0,
            np.log1p(purchases) / 3.0,
            mobile / np.maximum(views, 1.0),
            tolerance,
        ]).astype(np.float32)

        i_views = np.bincount(hist.item, minlength=n_i).astype(np.float64)
        i_clicks = np.bincount(hist.item, weights=hist.click, minlength=n_i)
        item_ctr = (i_clicks + 20 * global_ctr) / (i_views + 20)
        brand_bucket = (items.brand * _HASH_MULT) % (2**32) % BRAND_BUCKETS
        item_block = np.column_stack([
            np.eye(c)[items.category],
            np.eye(BRAND_BUCKETS)[brand_bucket],
            np.log(items.price) / 7.0,
            items.rel_log_price,
            np.log1p(i_views) / 8.0,
            item_ctr * 5.0,
        ]).astype(np.float32)
        return cls(c, b, data, user_block, item_block, cat_share, brand_share, tolerance)

    @property
    def user_dim(self) -> int:
        return int(self.user_block.shape[1])

    @property
    def item_dim(self) -> int:
        return int(self.item_block.shape[1])

    @property
    def context_dim(self) -> int:
        return 2 + len(DEVICES) + 1

    @property
    def dim(self) -> int:
        return self.user_dim + self.item_dim + self.context_dim + 3

    def feature_names(self) -> list[str]:
        c = self.n_categories
        return (
            [f"user_cat_share_{k}" for k in range(c)]
            + ["user_log_sessions", "user_log_views", "user_ctr", "user_log_purchases", "user_mobile_share",
               "user_price_tolerance"]
            + [f"item_cat_{k}" for k in range(c)] + [f"item_brand_bucket_{k}" for k in range(BRAND_BUCKETS)]
            + ["item_log_price", "item_rel_log_price", "item_log_views", "item_ctr"]
            + ["hour_sin", "hour_cos"] + [f"device_{d}" for d in DEVICES] + ["weekend"]
            + ["x_user_share_of_item_cat", "x_user_share_of_item_brand", "x_price_tolerance_x_rel_price"]
        )

    def user_features(self, user: np.ndarray) -> np.ndarray:
        return self.user_block[np.asarray(user)]

    def item_features(self, item: np.ndarray) -> np.ndarray:
        return self.item_block[np.asarray(item)]

    @staticmethod
    def context_features(hour: np.ndarray, device: np.ndarray, day: np.ndarray) -> np.ndarray:
        hour = np.asarray(hour, dtype=np.float64)
        return np.column_stack([
            np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24),
            np.eye(len(DEVICES))[np.asarray(device)],
            (np.asarray(day) % 7 >= 5).astype(np.float64),
        ]).astype(np.float32)

    def transform(self, user: np.ndarray, item: np.ndarray, hour: np.ndarray, device: np.ndarray,
                  day: np.ndarray) -> np.ndarray:
        """The CTR model input for (user, item, context) rows; scalars broadcast (e.g. one user, many items)."""
        user, item, hour, device, day = np.broadcast_arrays(np.asarray(user), np.asarray(item), np.asarray(hour),
                                                            np.asarray(device), np.asarray(day))
        items = self.data.items
        # Explicit crosses, as production CTR models have: the MLP then need not learn a lookup from one-hots.
        cross = np.column_stack([
            self.user_cat_share[user, items.category[item]] * 3.0,
            self.user_brand_share[user, items.brand[item]] * 3.0,
            self.user_price_tolerance[user] * items.rel_log_price[item],
        ]).astype(np.float32)
        return np.concatenate([self.user_features(user), self.item_features(item),
                               self.context_features(hour, device, day), cross], axis=1)

    def request_columns(self) -> list[int]:
        """The columns one ranking request shares among its candidates: the user's block and the context's (the
        item and user x item columns differ per candidate). What `spec.serving.ranking.requestColumns` names."""
        users = range(self.user_dim)
        context = range(self.user_dim + self.item_dim, self.user_dim + self.item_dim + self.context_dim)
        return [*users, *context]

    def candidates(self, user: int, item_ids: np.ndarray, hour: int = 20, device: int = 0, day: int = 0) -> np.ndarray:
        """Feature rows scoring `item_ids` for one user in one context (what a serving request carries)."""
        return self.transform(np.int64(user), np.asarray(item_ids), np.int64(hour), np.int64(device), np.int64(day))

    def split(self, name: str) -> Split:
        """'train' = labelled days before the test window; 'test' = the last `test_days` days."""
        cfg, ev = self.data.config, self.data.events
        test_start = cfg.days - cfg.test_days
        if name == "train":
            mask = (ev.day >= cfg.history_days) & (ev.day < test_start)
        elif name == "test":
            mask = ev.day >= test_start
        else:
            raise ValueError(f"unknown split {name!r}: train or test")
        e = ev.select(mask)
        x = self.transform(e.user, e.item, e.hour, e.device, e.day)
        return Split(x, e.click.astype(np.float32), e.purchase.astype(np.float32), e.user, e.item)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties averaged."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(score.size)
    # Average ranks over ties so that a constant scorer gets exactly 0.5.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, AUC, precision, recall and F1 of predicted probabilities against 0/1 labels."""
    y = np.asarray(y).astype(bool).ravel()
    pred = np.asarray(prob).ravel() >= threshold
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float((pred == y).mean()),
        "auc": roc_auc(y, prob),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "positive_rate": float(y.mean()),
        "threshold": threshold,
        "n": int(y.size),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=DataConfig.n_users)
    p.add_argument("--items", type=int, default=DataConfig.n_items)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    data = generate(DataConfig(n_users=a.users, n_items=a.items, seed=a.seed))
    print(json.dumps(data.summary(), indent=2))


if __name__ == "__main__":
    main()
