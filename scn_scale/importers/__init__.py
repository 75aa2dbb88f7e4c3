"""Public FER benchmarks and plain image trees into shard sets with canonical class names.

One module per layout (docs/benchmarks.md): `rafdb`, `ferplus`, `affectnet`,
`imagefolder`, `csvlist`; `common` holds what they share. Each library function writes
the sets and returns an `ImportSummary`; `python -m scn_scale.importers` is the CLI.
"""

from scn_scale.importers.affectnet import import_affectnet
from scn_scale.importers.common import ImporterError, ImportOptions, ImportSummary
from scn_scale.importers.csvlist import import_csv
from scn_scale.importers.ferplus import import_ferplus
from scn_scale.importers.imagefolder import import_imagefolder
from scn_scale.importers.rafdb import import_rafdb

__all__ = [
    "ImportOptions",
    "ImportSummary",
    "ImporterError",
    "import_affectnet",
    "import_csv",
    "import_ferplus",
    "import_imagefolder",
    "import_rafdb",
]
