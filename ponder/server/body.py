"""The base of every request body model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictBody(BaseModel):
    """A request body: JSON types as given (no "1" for 1), and no field the server does not know.
    Fields named after Python keywords or pydantic attributes (`json`, `schema`) use aliases."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
