"""Roles of the one torch.distributed world: the role plan (which ranks train which
teacher, produce which teacher's logits, train the student) and the code each role runs."""
from __future__ import annotations

from dist_xqa.roles.plan import ProducerAssignment, Role, RoleGroup, RolePlan, plan_roles

__all__ = ["ProducerAssignment", "Role", "RoleGroup", "RolePlan", "plan_roles"]
