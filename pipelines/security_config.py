"""The portfolio's `security:` section: operators with their public keys, roles and permissions.

    security:
      operators:
        - id: alice
          public_key: "ed25519:BASE64-OF-32-BYTES"      # `mallwatt keys new alice` prints it
          roles: [operator]
        - id: bob
          public_key: "ed25519:..."
          roles: [operator]
      roles:                                            # optional: merged over DEFAULT_ROLES
        finance: {permissions: [money.topup, money.adjust], max_topup_minor: 500000}
      approval_scopes: [AREA, MALL]                     # orders that need a second operator

The worker checks every operator power command against this registry
(`pipelines.core.authority`): its signatures, the signers' permissions, a second operator's
approval for area- and mall-wide orders, and life-safety circuits. docs/security.md has the
roles table.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PERMISSIONS = ("power.meter", "power.account", "power.area", "power.mall", "power.approve",
               "money.topup", "money.adjust", "audit.read", "sql.write", "token.issue")

#: Roles and what they may do. A merchant acts only through portal tokens (pipelines/portal).
DEFAULT_ROLES: dict[str, dict[str, Any]] = {
    "admin": {"permissions": list(PERMISSIONS)},
    "operator": {"permissions": ["power.meter", "power.account", "power.area", "power.mall", "power.approve"]},
    "finance": {"permissions": ["money.topup", "money.adjust", "audit.read"], "max_topup_minor": 1_000_000,
                "max_adjustment_minor": 100_000},
    "analyst": {"permissions": []},
    "merchant": {"permissions": []},
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Role(_Model):
    permissions: list[str] = Field(default_factory=list)
    max_topup_minor: Annotated[int, Field(gt=0, le=10**12)] | None = None
    max_adjustment_minor: Annotated[int, Field(gt=0, le=10**12)] | None = None

    @field_validator("permissions")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(PERMISSIONS))
        if unknown:
            raise ValueError(f"unknown permissions {unknown} (known: {', '.join(PERMISSIONS)})")
        return value


def public_key_bytes(text: str) -> bytes:
    """The 32 raw bytes of an `ed25519:<base64>` key (ValueError naming what is wrong)."""
    prefix, _, body = text.partition(":")
    if prefix != "ed25519" or not body:
        raise ValueError("public_key must look like 'ed25519:<base64 of 32 bytes>' (mallwatt keys new prints it)")
    try:
        raw = base64.b64decode(body, validate=True)
    except ValueError:
        raise ValueError("public_key: not base64") from None
    if len(raw) != 32:
        raise ValueError(f"public_key: {len(raw)} bytes, an Ed25519 key has 32")
    return raw


class Operator(_Model):
    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
    public_key: str
    roles: list[str] = Field(min_length=1)
    disabled: bool = False  # a leaver: kept for the audit trail, signs nothing any more

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        public_key_bytes(value)
        return value


class SecurityConfig(_Model):
    operators: list[Operator] = Field(default_factory=list, max_length=10_000)
    roles: dict[str, Role] = Field(default_factory=dict)
    approval_scopes: list[str] = Field(default_factory=lambda: ["AREA", "MALL"])

    @field_validator("approval_scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        bad = sorted(set(value) - {"METER", "ACCOUNT", "AREA", "MALL"})
        if bad:
            raise ValueError(f"unknown scopes {bad} (METER, ACCOUNT, AREA, MALL)")
        return value

    @model_validator(mode="after")
    def _references(self) -> SecurityConfig:
        roles = self.all_roles()
        problems = [f"operators[{i}].roles: unknown role {r!r}" for i, op in enumerate(self.operators)
                    for r in op.roles if r not in roles]
        ids = [op.id for op in self.operators]
        problems += [f"operators: duplicate id {d!r}" for d in sorted({i for i in ids if ids.count(i) > 1})]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def all_roles(self) -> dict[str, Role]:
        return {**{name: Role(**spec) for name, spec in DEFAULT_ROLES.items()}, **self.roles}

    def permissions_of(self, operator_id: str) -> set[str]:
        op = next((o for o in self.operators if o.id == operator_id), None)
        if op is None or op.disabled:
            return set()
        roles = self.all_roles()
        return {p for r in op.roles for p in roles[r].permissions}
