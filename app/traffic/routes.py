"""/v1/clients/{client}/traffic: a client's destination countries and limits (admin key)."""

from __future__ import annotations

from fastapi import APIRouter

from app.db.session import AFTER_COMMIT
from app.kernel.errors import Forbidden, NotFound, Unauthorized, ValidationFailed, problem_responses
from app.kernel.settings import TrafficSettings
from app.traffic import rules as domain
from app.traffic.schemas import Limits, TrafficRulesIn, TrafficRulesOut
from app.web.deps import AdminDep, SessionDep, SettingsDep, TrafficDep
from app.web.params import ClientNamePath

router = APIRouter(prefix="/v1/clients", tags=["traffic"])


def _out(client: str, rules: domain.ClientRules, settings: TrafficSettings) -> TrafficRulesOut:
    countries = rules.permitted_countries
    limits = rules.limits(settings)
    return TrafficRulesOut(
        client=client,
        permitted_countries=None if countries is None else sorted(countries),
        **{name: getattr(rules, name) for name in domain.LIMIT_FIELDS},
        effective_countries=sorted(rules.countries(settings)),
        effective_limits=Limits(**{name: getattr(limits, name) for name in domain.LIMIT_FIELDS}),
    )


@router.get(
    "/{client_name}/traffic",
    response_model=TrafficRulesOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def get_traffic(
    client_name: ClientNamePath, session: SessionDep, _admin: AdminDep, settings: SettingsDep
) -> TrafficRulesOut:
    """A client's destination countries and limits, as set and as in force (admin key)."""
    rules = await domain.get_rules(session, client_name)
    return _out(client_name, rules, settings.traffic)


@router.put(
    "/{client_name}/traffic",
    response_model=TrafficRulesOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, ValidationFailed),
)
async def set_traffic(
    client_name: ClientNamePath,
    request: TrafficRulesIn,
    session: SessionDep,
    _admin: AdminDep,
    settings: SettingsDep,
    traffic: TrafficDep,
) -> TrafficRulesOut:
    """Replace a client's destination countries (only narrower than the service's) and limits
    (admin key). In force at once in this process, within LOOKUP_CACHE_SECONDS in the others."""
    countries = request.permitted_countries
    rules = domain.ClientRules(
        None if countries is None else frozenset(countries),
        *(getattr(request, name) for name in domain.LIMIT_FIELDS),
    )
    session.info.setdefault(AFTER_COMMIT, []).append(traffic.rules.forget)
    await domain.set_rules(
        session, client_name, rules, settings.traffic, max_segments=settings.max_segments
    )
    return _out(client_name, rules, settings.traffic)
