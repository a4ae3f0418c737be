"""A run's parquet results: score partitions, metrics tables, and their evaluation."""

from diffad_core.results.evaluation import (
    NO_GROUND_TRUTH, WEAK_REASONS, evaluate_defect_kinds, evaluate_run, per_image_metrics,
    weakest_images,
)
from diffad_core.results.legacy import is_legacy_partition, migrate_run
from diffad_core.results.reading import (
    CategoryScores, iter_maps, read_category, read_score_metadata, read_scores,
)
from diffad_core.results.storage import (
    ABLATION_MAP_COLUMN, ALL_COLUMNS, FORMAT_VERSION, IMAGE_COLUMNS, MAP_COLUMNS, MEAN_ROW,
    SCORE_COLUMNS, SCORE_METADATA_KEY, ResultsSchemaError, list_categories_in_run, map_type,
    part_files, partition_dir, score_schema, scores_dataset, scores_dir, validate_score_file,
    write_scores,
)
from diffad_core.results.tables import (
    ABLATION_METRIC_COLUMNS, DEFECT_METRICS_SCHEMA, METRICS_REQUIRED, METRICS_SCHEMA,
    defect_metrics_path, metrics_path, read_defect_metrics, read_metrics, write_defect_metrics,
    write_metrics,
)
from diffad_core.config import ABLATIONS

__all__ = [
    "ABLATIONS", "ABLATION_MAP_COLUMN", "ABLATION_METRIC_COLUMNS", "ALL_COLUMNS",
    "CategoryScores", "DEFECT_METRICS_SCHEMA", "FORMAT_VERSION", "IMAGE_COLUMNS", "MAP_COLUMNS",
    "MEAN_ROW", "METRICS_REQUIRED", "METRICS_SCHEMA", "NO_GROUND_TRUTH", "ResultsSchemaError",
    "SCORE_COLUMNS", "SCORE_METADATA_KEY", "WEAK_REASONS", "defect_metrics_path",
    "evaluate_defect_kinds", "evaluate_run", "is_legacy_partition", "iter_maps",
    "list_categories_in_run", "map_type", "metrics_path", "migrate_run", "part_files",
    "partition_dir", "per_image_metrics", "read_category", "read_defect_metrics", "read_metrics",
    "read_score_metadata", "read_scores", "score_schema", "scores_dataset", "scores_dir",
    "validate_score_file", "weakest_images", "write_defect_metrics", "write_metrics",
    "write_scores",
]
