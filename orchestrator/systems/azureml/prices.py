"""What an Azure ML node costs per hour, by VM size: the table orch prices passes with, and the user's overrides.

Source and date: Azure's public pay-as-you-go list prices for Linux VMs in East US, USD per hour, as published on
https://azure.microsoft.com/pricing/details/virtual-machines/linux/ and the Retail Prices API
(https://prices.azure.com/api/retail/prices), as of PRICES_AS_OF. Azure ML adds no surcharge on the VM price.
Low-priority / Spot: Azure prices them at up to 80-90% below dedicated and lets the Spot price move with demand;
the column below is 20% of the dedicated price (an estimate, marked so in every cost line), not a quote.
Prices differ by region and change: `orch config set price.<vm_size> <usd_per_hour>` (dedicated) and
`orch config set price.<vm_size>.low_priority <usd_per_hour>` override the table for your region and contract.
"""

from __future__ import annotations

import re
from typing import Any

from orchestrator.systems.base import NodePrice

PRICES_AS_OF = "2024-10"
LOW_PRIORITY_FACTOR = 0.2  # estimate when no low-priority price is known: 80% below dedicated

# vm size -> dedicated USD per node-hour (East US, Linux, pay-as-you-go, PRICES_AS_OF)
DEDICATED_USD_PER_HOUR: dict[str, float] = {
    # CPU: general purpose, compute and memory optimized
    "Standard_DS2_v2": 0.114,
    "Standard_DS3_v2": 0.229,
    "Standard_DS4_v2": 0.458,
    "Standard_DS11_v2": 0.185,
    "Standard_DS12_v2": 0.371,
    "Standard_D2s_v3": 0.096,
    "Standard_D4s_v3": 0.192,
    "Standard_D8s_v3": 0.384,
    "Standard_D16s_v3": 0.768,
    "Standard_D4s_v5": 0.192,
    "Standard_D8s_v5": 0.384,
    "Standard_D16s_v5": 0.768,
    "Standard_E4s_v3": 0.252,
    "Standard_E8s_v3": 0.504,
    "Standard_F4s_v2": 0.169,
    "Standard_F8s_v2": 0.338,
    "Standard_F16s_v2": 0.677,
    # GPU: T4, V100, A100, H100
    "Standard_NC4as_T4_v3": 0.526,
    "Standard_NC8as_T4_v3": 0.752,
    "Standard_NC16as_T4_v3": 1.204,
    "Standard_NC64as_T4_v3": 4.352,
    "Standard_NC6s_v3": 3.06,
    "Standard_NC12s_v3": 6.12,
    "Standard_NC24s_v3": 12.24,
    "Standard_NC24rs_v3": 13.464,
    "Standard_ND40rs_v2": 22.032,
    "Standard_NC24ads_A100_v4": 3.673,
    "Standard_NC48ads_A100_v4": 7.346,
    "Standard_NC96ads_A100_v4": 14.692,
    "Standard_ND96asr_v4": 27.197,
    "Standard_ND96amsr_A100_v4": 32.77,
    "Standard_NC40ads_H100_v5": 6.98,
    "Standard_NC80adis_H100_v5": 13.96,
    "Standard_ND96isr_H100_v5": 98.32,
}
PRICE_KEY = re.compile(r"^price\.(?P<vm>[A-Za-z][A-Za-z0-9_]*)(?:\.(?P<tier>low_priority|dedicated))?$")


def _canon(vm_size: str) -> str:
    return vm_size.strip().lower()


def overrides(profile: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(vm size lower-case, priority) -> USD/h from the profile's `price.<vm_size>[.low_priority]` keys."""
    out = {}
    for key, value in profile.items():
        m = PRICE_KEY.match(key)
        if m:
            out[(_canon(m["vm"]), m["tier"] or "dedicated")] = float(value)
    return out


def node_price(
    vm_size: str, priority: str, *, nodes: int = 1, profile: dict[str, Any] | None = None
) -> NodePrice | None:
    """The price of `nodes` nodes of vm_size at priority (dedicated | low_priority); None when neither the
    profile nor the table knows the size. A low-priority price the user did not set is their dedicated price
    (or the table's) times LOW_PRIORITY_FACTOR."""
    own = overrides(profile or {})
    table = {_canon(k): v for k, v in DEDICATED_USD_PER_HOUR.items()}
    vm = _canon(vm_size)
    low = priority == "low_priority"
    if low and (vm, "low_priority") in own:
        return NodePrice(vm_size, priority, own[(vm, "low_priority")], nodes, f"price.{vm_size}.low_priority")
    if (vm, "dedicated") in own:
        usd, source = own[(vm, "dedicated")], f"price.{vm_size}"
    elif vm in table:
        usd, source = table[vm], f"list price {PRICES_AS_OF}"
    else:
        return None
    if low:
        estimate = f"{source} x {LOW_PRIORITY_FACTOR} (estimate)"
        return NodePrice(vm_size, priority, usd * LOW_PRIORITY_FACTOR, nodes, estimate)
    return NodePrice(vm_size, priority, usd, nodes, source)


def check_price_setting(key: str, value: str) -> float:
    """`orch config set price.<vm_size>[.low_priority] <usd_per_hour>`: the value as a positive number."""
    from orchestrator.core.errors import UserError

    if not PRICE_KEY.match(key):
        raise UserError(f"{key}: expected price.<vm_size> or price.<vm_size>.low_priority (price.Standard_NC6s_v3)")
    try:
        usd = float(value)
    except ValueError:
        raise UserError(f"{key}: {value!r} is not a number of US dollars per node-hour") from None
    if not usd > 0:
        raise UserError(f"{key}: a price must be > 0 US dollars per node-hour (got {value})")
    return usd
