"""The built-in default dataset: seeded synthetic interaction logs with structure a sequence model can learn.

Two planted signals, so that a trained model beats item popularity by a wide margin:
- long-term interests: items fall into clusters, and each user draws from a few clusters with personal weights;
- short-term structure: every item has one successor (the next item of a fixed random cycle through its cluster),
  and with probability ``transition_probability`` the next interaction is the current item's successor.
Item popularity is nearly flat (clusters of equal size, uniform draws inside a cluster), so it predicts little.
"""

from __future__ import annotations

import numpy as np

from .tables import make_table


def generate_synthetic_interactions(
    num_users: int = 2000,
    num_items: int = 500,
    max_history_length: int = 60,
    seed: int = 0,
    *,
    min_history_length: int = 5,
    num_clusters: int | None = None,
    clusters_per_user: int = 3,
    transition_probability: float = 0.6,
):
    """Events (``user``, ``item``, ``timestamp``) in the schema of ``load_interactions``.

    History lengths are uniform in ``[min_history_length, max_history_length]``. ``num_clusters`` defaults to one
    cluster per 25 items. Users are ``"u0"``, ``"u1"``, ...; items ``"i0"``, ``"i1"``, ...; timestamps count
    interactions (user by user), so the event order is the time order.
    """
    if num_users < 1 or num_items < 2:
        raise ValueError(f"need at least 1 user and 2 items, got num_users={num_users}, num_items={num_items}")
    if not 1 <= min_history_length <= max_history_length:
        raise ValueError(f"need 1 <= min_history_length <= max_history_length, got {min_history_length} and "
                         f"{max_history_length}")
    if not 0.0 <= transition_probability <= 1.0:
        raise ValueError(f"transition_probability must lie in [0, 1], got {transition_probability}")
    rng = np.random.default_rng(seed)
    num_clusters = min(num_clusters or max(1, num_items // 25), num_items)
    clusters_per_user = min(clusters_per_user, num_clusters)

    # Clusters: contiguous runs of a random item order; the successor of an item is the next one in its run.
    items_in_order = rng.permutation(num_items)
    bounds = np.linspace(0, num_items, num_clusters + 1).astype(np.int64)
    cluster_start, cluster_size = bounds[:-1], np.diff(bounds)
    position = np.arange(num_items)
    cluster_of_position = np.searchsorted(bounds, position, side="right") - 1
    next_position = cluster_start[cluster_of_position] + (position - cluster_start[cluster_of_position] + 1) \
        % cluster_size[cluster_of_position]
    successor = np.empty(num_items, dtype=np.int64)
    successor[items_in_order] = items_in_order[next_position]

    # Long-term interests: a few clusters per user with Dirichlet weights.
    user_clusters = np.argsort(rng.random((num_users, num_clusters)), axis=1)[:, :clusters_per_user]
    user_weights = np.cumsum(rng.dirichlet(np.ones(clusters_per_user), size=num_users), axis=1)
    lengths = rng.integers(min_history_length, max_history_length + 1, size=num_users)

    def draw_from_interests(users: np.ndarray) -> np.ndarray:
        pick = (rng.random(len(users))[:, None] > user_weights[users]).sum(axis=1).clip(max=clusters_per_user - 1)
        cluster = user_clusters[users, pick]
        offset = (rng.random(len(users)) * cluster_size[cluster]).astype(np.int64)
        return items_in_order[cluster_start[cluster] + offset]

    # One step for all users whose history is still growing; users sorted by length, longest first.
    by_length = np.argsort(-lengths, kind="stable")
    sequences = np.empty((int(lengths.max()), num_users), dtype=np.int64)  # [step, user in by_length order]
    current = draw_from_interests(by_length)
    sequences[0] = current
    active = num_users
    for step in range(1, int(lengths.max())):
        while lengths[by_length[active - 1]] <= step:
            active -= 1
        users = by_length[:active]
        follow = rng.random(active) < transition_probability
        current = np.where(follow, successor[current[:active]], draw_from_interests(users))
        sequences[step, :active] = current

    # Flatten user by user (user 0 first), oldest interaction first.
    rank = np.empty(num_users, dtype=np.int64)
    rank[by_length] = np.arange(num_users)
    step_index = np.arange(sequences.shape[0])[None, :]
    mask = step_index < lengths[:, None]  # [user, step]
    item = sequences.T[rank][mask]
    user = np.repeat(np.arange(num_users), lengths)
    names = np.array([f"i{j}" for j in range(num_items)], dtype=object)
    user_names = np.array([f"u{u}" for u in range(num_users)], dtype=object)
    return make_table({
        "user": user_names[user],
        "item": names[item],
        "timestamp": np.arange(len(item), dtype=np.float64),
    })
