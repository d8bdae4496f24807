"""Firmware signatures (#27 item 3, migration 0007): one row per signature the service made, so the
rollback check can find the highest version signed for a manufacturer's product. The audit log records
the same facts in its hash chain (pki/firmware.py)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index
from sqlmodel import Field, SQLModel


class FirmwareSignature(SQLModel, table=True):
    __tablename__ = "firmware_signature"
    __table_args__ = (Index("ix_firmware_signature_tenant_product", "tenant", "product"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=128)  # the manufacturer organization
    product: str = Field(index=True, max_length=64)
    version: str = Field(max_length=64)
    sha256: str = Field(max_length=64)  # of the firmware image, hex
    size: int | None = Field(default=None, sa_type=BigInteger)  # bytes, when the image itself was streamed
    issuer: str = Field(max_length=64)  # the signing certificate: its CA and serial
    serial: str = Field(max_length=40)
    signature: str = Field(max_length=800)  # base64, as UpdateFirmwareRequest.firmware.signature
    forced: bool = False  # signed below the highest version with force (rollback allowed by an operator)
    actor: str = Field(max_length=256)
    created_at: datetime
