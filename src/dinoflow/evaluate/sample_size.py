"""When is a number resting on too few images to be read without care? The thresholds live here, once.

A probe accuracy measured on fewer than `MIN_IMAGES` test images, or an interval of `dinoflow compare` whose
resamples draw fewer than `MIN_IMAGES` images, moves in steps of 1/n or more and its percentile-bootstrap interval
is itself rough (percentile intervals of small samples tend to be too narrow; Efron & Tibshirani 1993, An
Introduction to the Bootstrap). Near-duplicate
groups are the independent units: a test split or a group bootstrap over fewer than `MIN_GROUPS` groups has few
independent pieces of evidence however many images they hold. Such numbers are still reported; the probes and
compare stages log a warning naming the label column / metric and the counts, compare.json carries the note
(`small_sample`) and the report shows it next to the number.
"""

from __future__ import annotations

MIN_IMAGES = 100  # test images of a probe split, or images behind a compare interval
MIN_GROUPS = 30   # near-duplicate groups among them (when groups are the independent units)


def small_sample_note(n_images: int, n_groups: int | None = None) -> str | None:
    """A short note when `n_images` < MIN_IMAGES or `n_groups` (None: not counted) < MIN_GROUPS, else None.

    E.g. "few images: 7 (< 100) in 5 groups (< 30); read the number and its interval as rough".
    """
    few_images = n_images < MIN_IMAGES
    few_groups = n_groups is not None and n_groups < MIN_GROUPS
    if not (few_images or few_groups):
        return None
    images = f"{n_images} image{'s' if n_images != 1 else ''}" + (f" (< {MIN_IMAGES})" if few_images else "")
    groups = "" if n_groups is None else \
        f" in {n_groups} group{'s' if n_groups != 1 else ''}" + (f" (< {MIN_GROUPS})" if few_groups else "")
    return f"few images: {images}{groups}; read the number and its interval as rough"
