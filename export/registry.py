"""Put a bundle into the local BentoML model store, so the service can load it by ``name:version``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from corinfomax.core.bundle import BUNDLE_FORMAT, CARD_FILE, MODEL_FILE, PROBE_FILE, VERIFY_FILE, read_card
from corinfomax.core.errors import UserError

log = logging.getLogger(__name__)


class RegistryError(UserError):
    """A tag that is already in the model store."""


def register_bundle(bundle: str | Path, overwrite: bool = False) -> str:
    """Copy the bundle's files into a new BentoML model ``name:version``; return the tag."""
    import bentoml
    from bentoml.exceptions import NotFound

    bundle = Path(bundle)
    card = read_card(bundle)
    tag = card.tag
    try:
        bentoml.models.get(tag)
        exists = True
    except NotFound:
        exists = False
    if exists:
        if not overwrite:
            raise RegistryError(f"model {tag} is already in the BentoML model store; pass --overwrite to replace it, "
                                f"or --version to register under another version")
        bentoml.models.delete(tag)
    labels = {"precision": card.precision, "backbone": card.backbone, "format": BUNDLE_FORMAT}
    metadata = {"embedding_dim": card.embedding_dim, "checkpoint_sha256": card.checkpoint_sha256,
                "exported_at": card.exported_at}
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        for name in (MODEL_FILE, CARD_FILE, PROBE_FILE, VERIFY_FILE):
            if (bundle / name).is_file():
                shutil.copy2(bundle / name, Path(model.path) / name)
    log.info("registered %s in the BentoML model store (%s)", tag, bentoml.models.get(tag).path)
    return tag
