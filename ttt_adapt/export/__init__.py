"""Exporting a trained run (`folder`: the export folder, refreshing an old one's code, the atomic staging;
`card`: the model card; `hub`: pushing to the Hugging Face Hub), and its errors.

    from ttt_adapt.export.folder import export_model
    export_model("runs/tiny", "exports/tiny", dtype="bfloat16", push_to_hub="me/tiny-ttt", revision="v1")
"""

from ttt_adapt._util import RecipeError


class ExportError(RecipeError):
    """Bad export input (missing checkpoint, a folder with no run, unknown dtype, bad repo id, ...); one line."""


class PushError(ExportError):
    """The export is on disk but pushing it to the Hub failed; one line."""


__all__ = ["ExportError", "PushError"]
