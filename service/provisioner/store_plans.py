"""Which plan a store has and which it should have: the subscription's Price names the
plan billing wants; the store keeps the plan its container was given until a converge
applies the new one (limits changed in place) or the role refuses it (the store uses
more than the new plan allows), which leaves the old plan until an admin decides.
"""

from __future__ import annotations

from provisioner import lifecycle
from provisioner.config import Config
from provisioner.models import Instance, LogEntry, utcnow
from provisioner.plans import Plan, by_price, default


def current(config: Config, instance: Instance) -> Plan | None:
    """The plan whose limits the store's container has (or gets when first made); a
    store made before plans has the default plan. None when its plan left the plans
    file: its limits are then left as they are, never swapped for another plan's."""
    if instance.plan_price_id is None or not config.plans_file:
        # Without a plans file there is one plan, whatever STRIPE_PRICE_ID was then.
        return default(config)
    return by_price(config, instance.plan_price_id)


def wanted(config: Config, instance: Instance) -> Plan | None:
    """The plan billing asks for, unless that change was refused and not forced since."""
    subscription = instance.subscription
    price_id = subscription.price_id if subscription is not None else None
    plan = by_price(config, price_id) if price_id else None
    if plan is None or (price_id == instance.plan_refused and not instance.plan_force):
        return current(config, instance)
    return plan


def change_pending(config: Config, instance: Instance) -> bool:
    """A built store whose container should get another plan's limits."""
    if instance.provisioned_at is None:
        return False
    plan, have = wanted(config, instance), current(config, instance)
    return plan is not None and (have is None or plan.price_id != have.price_id)


def name_of(config: Config, instance: Instance) -> str:
    """The plan's name for people; a plan no longer in the file by its Price."""
    plan = current(config, instance)
    return plan.name if plan is not None else f"{instance.plan_price_id} (not in the plans)"


def billed_text(config: Config, instance: Instance) -> str:
    """What the customer pays a month: their subscription's own price when Stripe told
    us (a discount, a plan change not applied yet), else their plan's."""
    subscription = instance.subscription
    if subscription is not None and subscription.monthly_amount is not None:
        return Plan(key="x", name="x", price_id="price_x", currency=subscription.currency
                    or default(config).currency,
                    price_pence=subscription.monthly_amount).price_text
    plan = current(config, instance)
    return plan.price_text if plan is not None else ""


def unknown_price(config: Config, instance: Instance) -> str | None:
    """The subscription's Price when no plan has it (shown to the admin), else None."""
    subscription = instance.subscription
    price_id = subscription.price_id if subscription is not None else None
    return price_id if price_id and by_price(config, price_id) is None else None


def applied(instance: Instance, plan: Plan) -> None:
    """The container has this plan's limits now (needs a db_session). The same plan
    again (a refused change's store reaching its state) leaves the refusal standing."""
    if instance.plan_price_id == plan.price_id:
        return
    if instance.provisioned_at is not None:
        LogEntry(instance=instance, message=f"plan {plan.name} ({plan.limits_text()}) applied")
    instance.plan_price_id = plan.price_id
    instance.plan_refused = None
    instance.plan_problem = None
    instance.plan_force = False


def refused(instance: Instance, plan: Plan, reason: str) -> None:
    """The role would not lower the limits below what the store uses: it keeps its plan,
    the admin hears once per refused plan (needs a db_session)."""
    instance.plan_refused = plan.price_id
    instance.plan_problem = reason
    instance.plan_force = False
    instance.updated_at = utcnow()
    LogEntry(instance=instance, level="warning", message=f"plan {plan.name} refused: {reason}")
    lifecycle.notify(instance, "admin_plan_refused",
                     key=f"{plan.price_id}@{utcnow().isoformat(timespec='microseconds')}")


def force(config: Config, instance: Instance) -> Plan:
    """An admin applies the refused plan anyway (needs a db_session); returns it."""
    subscription = instance.subscription
    plan = by_price(config, subscription.price_id if subscription else None)
    if plan is None or plan.price_id != instance.plan_refused:
        raise ValueError("no refused plan change is waiting for this store")
    instance.plan_force = True
    instance.plan_refused = None
    LogEntry(instance=instance, message=f"plan {plan.name} to be applied although refused")
    lifecycle.reconcile(instance, config)
    return plan
