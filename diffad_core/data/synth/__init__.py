"""Synthetic MVTec-AD-format dataset: the embedded default data (docs/internals.md "Data").

Four categories (``config.SYNTH_CATEGORIES``): two textures ("weave", "gravel") and two
objects ("washer", RGB; "bolt", grayscale), rendered in ``scenes``; four more, cut from other
photographs (``photos``: the photo tuning family), only when named. Defects are painted on a
clean normal image by ``defects`` and the ground-truth mask is exactly the region whose
pixels were changed; ``defects.paint_defects`` paints the same defects on arbitrary images.
``writer.generate_dataset`` writes the dataset (METHOD.md §1); ``canvas`` holds the scene
model and pixel-grid helpers they share.
"""

from diffad_core.data.synth.defects import ANY_IMAGE_DEFECTS, paint_defects
from diffad_core.data.synth.scenes import CATEGORY_CHANNELS, CATEGORY_DEFECTS
from diffad_core.data.synth.writer import GENERATOR_VERSION, MARKER_NAME, generate_dataset

__all__ = [
    "ANY_IMAGE_DEFECTS",
    "CATEGORY_CHANNELS",
    "CATEGORY_DEFECTS",
    "GENERATOR_VERSION",
    "MARKER_NAME",
    "generate_dataset",
    "paint_defects",
]
