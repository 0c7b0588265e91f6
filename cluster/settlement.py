"""Settlement windows, settlements, continuous gross settlement and interchange fees (the I/O shell).

The rules are in ``core/settlement.py``; this module reads rows, asks those rules, and applies what
they decide: rows here, money through the position shards (``LedgerClient``), never an UPDATE of a
balance. It runs in the hub process, next to the admin API that serves it (``api/settlement.py``).

Contract
--------
* **Window membership costs the transfer path nothing.** A window is a range of journal sequence
  numbers per shard: closing window W records each shard's durable sequence (``shard.last_durable_seq``,
  read from Postgres, no call to the shard) as W's upper boundary. A transfer belongs to the window
  whose range holds its COMMIT row, so every transfer is in exactly one window, and a transfer whose
  commit was reported before the close (reports wait for durability) is in the closed window.
* **Content is aggregated from durable rows** (``journal`` x ``transfer``, ``transfer_fee``) once the
  post-commit processor has read past the boundary, so it can be recomputed and always nets to zero.
* **The post-commit processor** reads each shard's journal behind a durable cursor
  (``settlement_cursor``) and, for currencies that need it, makes the continuous gross settlement
  moves and the interchange fee moves, as idempotent Check.NONE (or funds-checked) ledger commands with
  ids derived from the transfer id. It adds no work to the shards' transfer path: it is one more
  client, batched, behind the flush. A cursor only advances after the moves it covers are durable.
* **Settlement steps are idempotent**: ledger transfer ids are ``settlement:{sid}:{account}``, account
  acknowledgements may be repeated, and a step whose ledger effects failed half way is completed by
  the next acknowledgement of the same state.
* **Bounds**: ``SettlementSettings`` (RAYLOOP_SETTLEMENT_* variables).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from cluster.ledger_client import LedgerClient
from core.ledger import AccountType, Outcome
from core.money import from_decimal, to_decimal
from core.settlement import (
    SETTLEABLE_CONTENT,
    Delay,
    FeePayer,
    Granularity,
    Interchange,
    Model,
    Movement,
    SettlementState,
    Transition,
    WindowState,
    account_transition,
    bilateral,
    can_abort,
    content_state_for_settlement,
    fee_movement,
    multilateral,
    raised_net_debit_cap,
    resolve_model,
    settlement_moves,
    settlement_state_of,
    window_state_of,
)
from protos import ledger_pb2 as pb

log = logging.getLogger(__name__)

_SETTLEMENT_RANK = {
    SettlementState.PENDING_SETTLEMENT: 0,
    SettlementState.PS_TRANSFERS_RECORDED: 1,
    SettlementState.PS_TRANSFERS_RESERVED: 2,
    SettlementState.PS_TRANSFERS_COMMITTED: 3,
    SettlementState.SETTLING: 4,
    SettlementState.SETTLED: 5,
}
_OK = (Outcome.OK.value, Outcome.DUPLICATE.value)
_WARNED_MAX = 10_000


@dataclass(frozen=True, slots=True)
class SettlementSettings:
    tick_ms: int = 100  # how often the post-commit processor and the window aggregator run
    scan_max: int = 20_000  # journal sequence numbers read per shard and tick
    batch_max: int = 256  # gross and fee moves per call to a shard (like an ingress batch)
    close_wait_ms: int = 5_000  # how long closing a window waits for its content before answering
    aggregate_late_ms: int = 60_000  # a window still not aggregated after this is FAILED (retried anyway)


class SettlementError(Exception):
    """An expected refusal: FSPIOP error code, detail, HTTP status."""

    def __init__(self, code: int, detail: str, status: int = 400):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status


def model_from_row(row: asyncpg.Record) -> Model:
    return Model(
        model_id=row["settlement_model_id"], name=row["name"], delay=Delay(row["settlement_delay"]),
        granularity=Granularity(row["settlement_granularity"]), interchange=Interchange(row["settlement_interchange"]),
        currency=row["currency"].strip() if row["currency"] is not None else None,
        ledger_account_type=row["ledger_account_type"], settlement_account_type=row["settlement_account_type"],
        require_liquidity_check=row["require_liquidity_check"], auto_position_reset=row["auto_position_reset"],
        is_active=row["is_active"],
    )


async def load_models(connection) -> list[Model]:
    return [model_from_row(r) for r in await connection.fetch(
        "SELECT settlement_model_id, name, is_active, settlement_granularity, settlement_interchange,"
        " settlement_delay, currency, require_liquidity_check, ledger_account_type, settlement_account_type,"
        " auto_position_reset FROM settlement_model ORDER BY settlement_model_id"
    )]


async def onboarding_account_types(connection, currency: str) -> list[str]:
    """Account types a DFSP needs for ``currency`` beyond POSITION and SETTLEMENT: each active model that
    applies to the currency (its own, or the default for its ledger account type) brings its ledger and
    settlement account types (e.g. INTERCHANGE_FEE and INTERCHANGE_FEE_SETTLEMENT)."""
    models = await load_models(connection)
    needed: list[str] = []
    for account_type in sorted({m.ledger_account_type for m in models}):
        model = resolve_model(models, currency, account_type)
        if model is None:
            continue
        for wanted in (model.ledger_account_type, model.settlement_account_type):
            if wanted not in (AccountType.POSITION, AccountType.SETTLEMENT) and wanted not in needed:
                needed.append(wanted)
    return needed


class SettlementService:
    def __init__(self, pool: asyncpg.Pool, ledger: LedgerClient, *, hub_name: str,
                 settings: SettlementSettings | None = None):
        self.pool = pool
        self.ledger = ledger
        self.hub_name = hub_name
        self.settings = settings or SettlementSettings()
        # One operator action at a time: closing, creating and moving settlements are rare and must
        # not interleave (two closes of one window, two settlements of one content).
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._aggregated = asyncio.Event()
        self._participants: dict[str, tuple[int, int]] = {}  # name -> (participant_id, shard_id)
        self._accounts: dict[tuple[str, str, str], int] = {}  # (name, currency, type) -> account_id
        self._warned: set[tuple[str, str, str]] = set()  # DFSP pairs without fee accounts, already logged
        self.ticks = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="settlement-processor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_ms / 1000)
            try:
                await self.tick()
            except Exception:  # Postgres or a shard away: the cursors did not move, the next tick retries
                log.exception("settlement tick failed")

    async def tick(self) -> None:
        await self._process_commits()
        await self._aggregate_pending()
        self.ticks += 1

    # ------------------------------------------------------------------ lookups

    async def _participant(self, name: str) -> tuple[int, int]:
        found = self._participants.get(name)
        if found is None:
            row = await self.pool.fetchrow("SELECT participant_id, shard_id FROM participant WHERE name = $1", name)
            if row is None:
                raise SettlementError(3200, f"participant {name} not found")
            found = self._participants[name] = (row["participant_id"], row["shard_id"])
        return found

    async def _account(self, name: str, currency: str, account_type: str) -> int | None:
        key = (name, currency, account_type)
        found = self._accounts.get(key)
        if found is None:
            found = await self.pool.fetchval(
                "SELECT a.account_id FROM account a JOIN participant p USING (participant_id)"
                " WHERE p.name = $1 AND a.currency = $2 AND a.ledger_account_type = $3",
                name, currency, account_type,
            )
            if found is not None:
                self._accounts[key] = found  # account ids never change once created
        return found

    async def _hub_settlement_account(self, currency: str) -> int:
        account = await self._account(self.hub_name, currency, AccountType.HUB_MULTILATERAL_SETTLEMENT)
        if account is None:
            raise SettlementError(3200, f"hub account HUB_MULTILATERAL_SETTLEMENT for {currency} does not exist")
        return account

    # ------------------------------------------------------------------ post-commit processor

    async def _process_commits(self) -> None:
        async with self.pool.acquire() as connection:
            shards = await connection.fetch("SELECT shard_id, last_durable_seq FROM shard ORDER BY shard_id")
            cursors = {r["shard_id"]: r["seq"] for r in await connection.fetch(
                "SELECT shard_id, seq FROM settlement_cursor")}
            models = await load_models(connection)
            fee_rules = {r["currency"].strip(): (r["basis_points"], FeePayer(r["paid_by"])) for r in
                         await connection.fetch("SELECT currency, basis_points, paid_by FROM interchange_fee_rule")}
        gross_any = any(m.continuous_gross and m.is_active for m in models)
        for shard in shards:
            shard_id = shard["shard_id"]
            cursor = cursors.get(shard_id, 0)
            upper = min(shard["last_durable_seq"], cursor + self.settings.scan_max)
            if upper <= cursor:
                continue
            fees: list[tuple] = []
            if gross_any or fee_rules:
                rows = await self.pool.fetch(
                    "SELECT t.transfer_id, t.currency, t.payer, t.payee, t.amount, t.payer_account_id,"
                    " t.payee_account_id FROM journal j JOIN transfer t ON t.transfer_id = j.transfer_id"
                    " WHERE j.shard_id = $1 AND j.kind = 2 AND j.seq > $2 AND j.seq <= $3 ORDER BY j.seq",
                    shard_id, cursor, upper,
                )
                fees = await self._settle_commits(rows, models, fee_rules)
            async with self.pool.acquire() as connection, connection.transaction():
                if fees:
                    await connection.executemany(
                        "INSERT INTO transfer_fee (transfer_id, currency, debtor, creditor, fee)"
                        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (transfer_id) DO NOTHING",
                        fees,
                    )
                await connection.execute(
                    "INSERT INTO settlement_cursor (shard_id, seq) VALUES ($1, $2)"
                    " ON CONFLICT (shard_id) DO UPDATE SET seq = greatest(settlement_cursor.seq, EXCLUDED.seq)",
                    shard_id, upper,
                )

    async def _settle_commits(self, rows, models: list[Model], fee_rules: dict) -> list[tuple]:
        """Gross settlement and fee moves for committed transfers; returns the fee rows to record.

        Raises if a shard cannot be reached, so the cursor stays and the whole range is retried (the
        moves that did happen are duplicates then, by their ids).
        """
        by_shard: dict[int, list[tuple[pb.Command, tuple | None, str]]] = defaultdict(list)
        for row in rows:
            transfer_id, currency = row["transfer_id"], row["currency"].strip()
            payer, payee, amount_minor = row["payer"], row["payee"], from_decimal(row["amount"])
            model = resolve_model(models, currency, AccountType.POSITION)
            if model is not None and model.continuous_gross:
                payer_settlement = await self._account(payer, currency, AccountType.SETTLEMENT)
                payee_settlement = await self._account(payee, currency, AccountType.SETTLEMENT)
                _, payer_shard = await self._participant(payer)
                _, payee_shard = await self._participant(payee)
                # The payer's liquidity pays its position back to zero (funds-checked: a settlement
                # balance never goes above zero); the payee's position is paid into its settlement account.
                by_shard[payer_shard].append((pb.Command(reserve=pb.Reserve(
                    transfer_id=f"gross:{transfer_id}:payer", debit_account_id=payer_settlement,
                    credit_account_id=row["payer_account_id"], amount_minor=str(amount_minor),
                    check=pb.CHECK_FUNDS_AVAILABLE, commit_now=True)), None, transfer_id))
                by_shard[payee_shard].append((pb.Command(reserve=pb.Reserve(
                    transfer_id=f"gross:{transfer_id}:payee", debit_account_id=row["payee_account_id"],
                    credit_account_id=payee_settlement, amount_minor=str(amount_minor),
                    check=pb.CHECK_NONE, commit_now=True)), None, transfer_id))
            rule = fee_rules.get(currency)
            if rule is not None:
                movement = fee_movement(payer, payee, amount_minor, rule[0], rule[1])
                if movement is None:
                    continue
                debtor = await self._account(movement.payer, currency, AccountType.INTERCHANGE_FEE)
                creditor = await self._account(movement.payee, currency, AccountType.INTERCHANGE_FEE)
                if debtor is None or creditor is None:
                    pair = (movement.payer, movement.payee, currency)
                    if pair not in self._warned and len(self._warned) < _WARNED_MAX:  # once per pair, not per transfer
                        self._warned.add(pair)
                        log.warning("no INTERCHANGE_FEE accounts for %s/%s in %s (onboarded before the fee model?):"
                                    " their transfers carry no fee, e.g. %s", *pair, transfer_id)
                    continue
                _, debtor_shard = await self._participant(movement.payer)
                fee_row = (transfer_id, currency, movement.payer, movement.payee, to_decimal(movement.amount_minor))
                by_shard[debtor_shard].append((pb.Command(reserve=pb.Reserve(
                    transfer_id=f"fee:{transfer_id}", debit_account_id=debtor, credit_account_id=creditor,
                    amount_minor=str(movement.amount_minor), check=pb.CHECK_NONE, commit_now=True)),
                    fee_row, transfer_id))
        size = self.settings.batch_max

        async def send(shard: int, items: list) -> list:
            # One chunk at a time per shard: transfer batches queued behind a chunk wait for it, so
            # chunks stay small and never pile up (shards still work in parallel).
            return [(shard, chunk, await self.ledger.execute(shard, [c for c, _, _ in chunk]))
                    for chunk in (items[i:i + size] for i in range(0, len(items), size))]

        sent = await asyncio.gather(*(send(shard, items) for shard, items in by_shard.items()))
        fees = []
        for shard, items, reply in (call for calls in sent for call in calls):
            for (command, fee_row, transfer_id), result in zip(items, reply.results, strict=True):
                if result.outcome in _OK:
                    if fee_row is not None:
                        fees.append(fee_row)
                else:
                    # Not retried: the same refusal would come back. The transfer stays in its
                    # position and is reported; an operator settles it by hand.
                    log.error("settlement move %s for transfer %s refused on shard %s: %s",
                              command.reserve.transfer_id, transfer_id, shard, result.outcome)
        return fees

    # ------------------------------------------------------------------ windows

    async def close_window(self, window_id: int, reason: str) -> int:
        """Close an OPEN, non-empty window and open the next; returns the new window's id."""
        async with self._lock:
            async with self.pool.acquire() as connection, connection.transaction():
                state = await connection.fetchval(
                    "SELECT state FROM settlement_window WHERE settlement_window_id = $1 FOR UPDATE", window_id
                )
                if state is None:
                    raise SettlementError(3100, f"settlement window {window_id} does not exist")
                if state != WindowState.OPEN:
                    raise SettlementError(3100, f"settlement window {window_id} is {state}, not OPEN")
                shards = await connection.fetch("SELECT shard_id, last_durable_seq FROM shard ORDER BY shard_id")
                previous = {r["shard_id"]: r["to_seq"] for r in await connection.fetch(
                    "SELECT shard_id, max(to_seq) AS to_seq FROM settlement_window_boundary GROUP BY shard_id")}
                ranges = [(s["shard_id"], previous.get(s["shard_id"], 0), s["last_durable_seq"]) for s in shards]
                empty = not await connection.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM unnest($1::integer[], $2::bigint[], $3::bigint[])"
                    " AS b(shard_id, from_seq, to_seq)"
                    " JOIN journal j ON j.shard_id = b.shard_id AND j.seq > b.from_seq AND j.seq <= b.to_seq"
                    " AND j.kind = 2 JOIN transfer t ON t.transfer_id = j.transfer_id)",
                    *_columns(ranges),
                )
                if empty:
                    raise SettlementError(3100, f"settlement window {window_id} is empty: nothing to close")
                await connection.executemany(
                    "INSERT INTO settlement_window_boundary (settlement_window_id, shard_id, from_seq, to_seq)"
                    " VALUES ($1, $2, $3, $4)",
                    [(window_id, *r) for r in ranges],
                )
                await connection.execute(
                    "UPDATE settlement_window SET state = 'PROCESSING', reason = $2, changed_at = now()"
                    " WHERE settlement_window_id = $1", window_id, reason,
                )
                new_id = await connection.fetchval(
                    "INSERT INTO settlement_window (state, reason) VALUES ('OPEN', $1) RETURNING settlement_window_id",
                    f"opened when window {window_id} closed",
                )
        # Answer once the content is known when that is quick (usually the next tick); otherwise the
        # window stays PROCESSING and the processor finishes it.
        deadline = time.monotonic() + self.settings.close_wait_ms / 1000
        while time.monotonic() < deadline:
            if await self._aggregate(window_id):
                break
            await asyncio.sleep(self.settings.tick_ms / 1000)
        return new_id

    async def _aggregate_pending(self) -> None:
        rows = await self.pool.fetch(
            "SELECT settlement_window_id, state, changed_at FROM settlement_window"
            " WHERE state IN ('PROCESSING', 'FAILED') ORDER BY settlement_window_id"
        )
        for row in rows:
            if await self._aggregate(row["settlement_window_id"]):
                continue
            age_ms = (time.time() - row["changed_at"].timestamp()) * 1000
            if row["state"] == WindowState.PROCESSING and age_ms > self.settings.aggregate_late_ms:
                log.error("settlement window %s not aggregated after %d ms: FAILED (still retried)",
                          row["settlement_window_id"], age_ms)
                await self.pool.execute(
                    "UPDATE settlement_window SET state = 'FAILED', changed_at = now()"
                    " WHERE settlement_window_id = $1 AND state = 'PROCESSING'", row["settlement_window_id"],
                )

    async def _aggregate(self, window_id: int) -> bool:
        """Compute a closed window's content once the processor has read past its boundaries."""
        # The close call and the background loop may both try one window: the row lock orders them and
        # the state check makes the second a no-op.
        async with self.pool.acquire() as connection, connection.transaction():
            state = await connection.fetchval(
                "SELECT state FROM settlement_window WHERE settlement_window_id = $1 FOR UPDATE", window_id
            )
            if state not in (WindowState.PROCESSING, WindowState.FAILED):
                return True
            ranges = [(r["shard_id"], r["from_seq"], r["to_seq"]) for r in await connection.fetch(
                "SELECT shard_id, from_seq, to_seq FROM settlement_window_boundary WHERE settlement_window_id = $1",
                window_id)]
            cursors = {r["shard_id"]: r["seq"] for r in await connection.fetch(
                "SELECT shard_id, seq FROM settlement_cursor")}
            if any(cursors.get(shard, 0) < to_seq for shard, _, to_seq in ranges):
                return False
            window_rows = (
                "FROM unnest($1::integer[], $2::bigint[], $3::bigint[]) AS b(shard_id, from_seq, to_seq)"
                " JOIN journal j ON j.shard_id = b.shard_id AND j.seq > b.from_seq AND j.seq <= b.to_seq"
                " AND j.kind = 2"
            )
            transfers = await connection.fetch(
                "SELECT t.currency, t.payer, t.payee, sum(t.amount) AS amount, count(*) AS n "
                f"{window_rows} JOIN transfer t ON t.transfer_id = j.transfer_id GROUP BY 1, 2, 3",
                *_columns(ranges),
            )
            fees = await connection.fetch(
                "SELECT f.currency, f.debtor AS payer, f.creditor AS payee, sum(f.fee) AS amount, count(*) AS n "
                f"{window_rows} JOIN transfer_fee f ON f.transfer_id = j.transfer_id GROUP BY 1, 2, 3",
                *_columns(ranges),
            )
            models = await load_models(connection)
            groups: dict[tuple[str, str], list[Movement]] = defaultdict(list)
            for account_type, rows in ((AccountType.POSITION, transfers), (AccountType.INTERCHANGE_FEE, fees)):
                for r in rows:
                    groups[(r["currency"].strip(), str(account_type))].append(
                        Movement(r["payer"], r["payee"], from_decimal(r["amount"]), r["n"]))
            names = sorted({n for movements in groups.values() for m in movements for n in (m.payer, m.payee)})
            accounts = {
                (r["name"], r["currency"].strip(), r["ledger_account_type"]): (r["participant_id"], r["account_id"])
                for r in await connection.fetch(
                    "SELECT p.name, p.participant_id, a.account_id, a.currency, a.ledger_account_type"
                    " FROM account a JOIN participant p USING (participant_id) WHERE p.name = ANY($1::text[])",
                    names,
                )
            }
            content_states = []
            for (currency, account_type), movements in sorted(groups.items()):
                model = resolve_model(models, currency, account_type)
                # Continuous gross content was settled transfer by transfer as it committed.
                content_state = WindowState.SETTLED if model is not None and model.continuous_gross \
                    else WindowState.CLOSED
                content_states.append(content_state)
                content_id = await connection.fetchval(
                    "INSERT INTO settlement_window_content (settlement_window_id, currency, ledger_account_type,"
                    " settlement_model_id, state) VALUES ($1, $2, $3, $4, $5) RETURNING content_id",
                    window_id, currency, account_type, model.model_id if model else None, content_state,
                )
                totals = multilateral(movements)
                await connection.executemany(
                    "INSERT INTO settlement_content_account (content_id, participant_id, account_id, sent, received,"
                    " sent_count, received_count, net) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    [(content_id, *accounts[(name, currency, account_type)], to_decimal(t.sent_minor),
                      to_decimal(t.received_minor), t.sent_count, t.received_count, to_decimal(t.net_minor))
                     for name, t in sorted(totals.items())],
                )
                await connection.executemany(
                    "INSERT INTO settlement_content_bilateral (content_id, party_a, party_b, net)"
                    " VALUES ($1, $2, $3, $4)",
                    [(content_id, a, b, to_decimal(net)) for (a, b), net in sorted(bilateral(movements).items())],
                )
            await connection.execute(
                "UPDATE settlement_window SET state = $2, changed_at = now() WHERE settlement_window_id = $1",
                window_id, window_state_of(content_states),
            )
        return True

    # ------------------------------------------------------------------ settlements

    async def create_settlement(self, model_name: str, reason: str, window_ids: list[int]) -> int:
        async with self._lock, self.pool.acquire() as connection, connection.transaction():
            models = await load_models(connection)
            model = next((m for m in models if m.name == model_name), None)
            if model is None:
                raise SettlementError(3100, f"settlement model {model_name} not found")
            if not model.is_active:
                raise SettlementError(3100, f"settlement model {model_name} is not active")
            if not model.settles_by_window:
                raise SettlementError(3100, f"settlement model {model_name} is {model.delay} {model.granularity}:"
                                            " only DEFERRED NET models settle by window")
            windows = {r["settlement_window_id"]: r["state"] for r in await connection.fetch(
                "SELECT settlement_window_id, state FROM settlement_window WHERE settlement_window_id = ANY($1)"
                " FOR UPDATE", window_ids)}
            for window_id in window_ids:
                if window_id not in windows:
                    raise SettlementError(3100, f"settlement window {window_id} not found")
                if windows[window_id] not in (WindowState.CLOSED, WindowState.ABORTED, WindowState.PENDING_SETTLEMENT):
                    raise SettlementError(3100, f"settlement window {window_id} is {windows[window_id]}:"
                                                " it must be CLOSED, ABORTED or PENDING_SETTLEMENT")
            contents = [
                r for r in await connection.fetch(
                    "SELECT content_id, settlement_window_id, currency, ledger_account_type, state"
                    " FROM settlement_window_content WHERE settlement_window_id = ANY($1) FOR UPDATE", window_ids)
                if r["state"] in SETTLEABLE_CONTENT
                and (resolved := resolve_model(models, r["currency"].strip(), r["ledger_account_type"])) is not None
                and resolved.model_id == model.model_id
            ]
            if not contents:
                raise SettlementError(3100, f"the windows hold nothing for settlement model {model_name} to settle")
            nets: dict[int, list] = {}
            for r in await connection.fetch(
                "SELECT c.participant_id, c.account_id, w.currency, sum(c.net) AS net"
                " FROM settlement_content_account c JOIN settlement_window_content w USING (content_id)"
                " WHERE c.content_id = ANY($1) GROUP BY 1, 2, 3 ORDER BY 2",
                [c["content_id"] for c in contents],
            ):
                nets[r["account_id"]] = [r["participant_id"], r["currency"].strip(), r["net"]]
            settlement_id = await connection.fetchval(
                "INSERT INTO settlement (settlement_model_id, state, reason) VALUES ($1, 'PENDING_SETTLEMENT', $2)"
                " RETURNING settlement_id", model.model_id, reason,
            )
            await connection.executemany(
                "INSERT INTO settlement_settlement_window (settlement_id, settlement_window_id) VALUES ($1, $2)",
                [(settlement_id, w) for w in sorted(set(window_ids))],
            )
            await connection.executemany(
                "INSERT INTO settlement_content_link (settlement_id, content_id) VALUES ($1, $2)",
                [(settlement_id, c["content_id"]) for c in contents],
            )
            await connection.executemany(
                "INSERT INTO settlement_participant_account (settlement_id, participant_id, account_id, currency, net,"
                " state) VALUES ($1, $2, $3, $4, $5, 'PENDING_SETTLEMENT')",
                [(settlement_id, p, a, c, net) for a, (p, c, net) in nets.items()],
            )
            await connection.execute(
                "INSERT INTO settlement_state_change (settlement_id, state, reason)"
                " VALUES ($1, 'PENDING_SETTLEMENT', $2)",
                settlement_id, reason,
            )
            await connection.execute(
                "UPDATE settlement_window_content SET state = 'PENDING_SETTLEMENT', settlement_id = $2,"
                " changed_at = now() WHERE content_id = ANY($1)",
                [c["content_id"] for c in contents], settlement_id,
            )
            await _refresh_windows(connection, window_ids)
        return settlement_id

    async def update_accounts(self, settlement_id: int, updates: list[dict]) -> dict[int, tuple[int, str]]:
        """Move accounts (``{participant_id, account_id, state, reason, external_reference}``); returns the
        refused ones: account id -> (error code, description). Then advances the settlement."""
        async with self._lock:
            async with self.pool.acquire() as connection, connection.transaction():
                settlement = await self._settlement_row(connection, settlement_id)
                if settlement["state"] in (SettlementState.SETTLED, SettlementState.ABORTED):
                    raise SettlementError(3100, f"settlement {settlement_id} is {settlement['state']}")
                rows = {r["account_id"]: r for r in await connection.fetch(
                    "SELECT participant_id, account_id, state FROM settlement_participant_account"
                    " WHERE settlement_id = $1 FOR UPDATE", settlement_id)}
                refused: dict[int, tuple[int, str]] = {}
                for update in updates:
                    account_id = update["account_id"]
                    row = rows.get(account_id)
                    if row is None or row["participant_id"] != update["participant_id"]:
                        refused[account_id] = (3100, f"account {account_id} of participant {update['participant_id']}"
                                                     f" is not in settlement {settlement_id}")
                        continue
                    try:
                        target = SettlementState(update["state"])
                    except ValueError:
                        refused[account_id] = (3100, f"unknown state {update['state']}")
                        continue
                    transition = account_transition(SettlementState(row["state"]), target)
                    if transition is Transition.NOT_ALLOWED:
                        refused[account_id] = (3100, f"State change from {row['state']} to {target} is not allowed")
                        continue
                    if transition is Transition.NEXT:
                        await connection.execute(
                            "UPDATE settlement_participant_account SET state = $3, reason = $4,"
                            " external_reference = $5, changed_at = now() WHERE settlement_id = $1 AND account_id = $2",
                            settlement_id, account_id, str(target), update.get("reason", ""),
                            update.get("external_reference", ""),
                        )
                        await connection.execute(
                            "INSERT INTO settlement_state_change (settlement_id, account_id, state, reason)"
                            " VALUES ($1, $2, $3, $4)",
                            settlement_id, account_id, str(target), update.get("reason", ""),
                        )
            await self._advance(settlement_id)
            return refused

    async def abort(self, settlement_id: int, reason: str) -> None:
        async with self._lock:
            async with self.pool.acquire() as connection:
                settlement = await self._settlement_row(connection, settlement_id)
                states = [SettlementState(r["state"]) for r in await connection.fetch(
                    "SELECT state FROM settlement_participant_account WHERE settlement_id = $1", settlement_id)]
            if not can_abort(SettlementState(settlement["state"]), states):
                raise SettlementError(3100, f"settlement {settlement_id} is {settlement['state']}: it can be aborted"
                                            " only before any account reached PS_TRANSFERS_COMMITTED")
            model = await self._model_of(settlement)
            if model.auto_position_reset:
                await self._release_reservations(settlement_id, reason)
            async with self.pool.acquire() as connection, connection.transaction():
                await self._set_state(connection, settlement_id, SettlementState.ABORTED, reason)

    async def _advance(self, settlement_id: int) -> None:
        """Apply the ledger effects the accounts' states call for, then record the settlement's new state."""
        async with self.pool.acquire() as connection:
            settlement = await self._settlement_row(connection, settlement_id)
            states = [SettlementState(r["state"]) for r in await connection.fetch(
                "SELECT state FROM settlement_participant_account WHERE settlement_id = $1", settlement_id)]
        old = SettlementState(settlement["state"])
        new = settlement_state_of(states)
        if _SETTLEMENT_RANK[new] <= _SETTLEMENT_RANK[old]:
            return
        model = await self._model_of(settlement)
        if model.auto_position_reset:
            reserved, committed = _SETTLEMENT_RANK[SettlementState.PS_TRANSFERS_RESERVED], \
                _SETTLEMENT_RANK[SettlementState.PS_TRANSFERS_COMMITTED]
            if _SETTLEMENT_RANK[old] < reserved <= _SETTLEMENT_RANK[new]:
                await self._reserve_recipients(settlement_id, model)
            if _SETTLEMENT_RANK[old] < committed <= _SETTLEMENT_RANK[new]:
                await self._commit_all(settlement_id)
        async with self.pool.acquire() as connection, connection.transaction():
            await self._set_state(connection, settlement_id, new, "")

    async def _set_state(self, connection, settlement_id: int, state: SettlementState, reason: str) -> None:
        await connection.execute(
            "UPDATE settlement SET state = $2, changed_at = now() WHERE settlement_id = $1", settlement_id, str(state)
        )
        await connection.execute(
            "INSERT INTO settlement_state_change (settlement_id, state, reason) VALUES ($1, $2, $3)",
            settlement_id, str(state), reason,
        )
        content_state = content_state_for_settlement(state)
        if content_state is None:
            return
        window_ids = [r["settlement_window_id"] for r in await connection.fetch(
            "UPDATE settlement_window_content w SET state = $2, changed_at = now() FROM settlement_content_link l"
            " WHERE l.content_id = w.content_id AND l.settlement_id = $1 AND w.settlement_id = $1"
            " RETURNING w.settlement_window_id", settlement_id, str(content_state))]
        await _refresh_windows(connection, window_ids)

    async def _moves(self, settlement_id: int):
        rows = await self.pool.fetch(
            "SELECT s.account_id, s.currency, s.net, p.name, p.shard_id FROM settlement_participant_account s"
            " JOIN participant p USING (participant_id) WHERE s.settlement_id = $1 ORDER BY s.account_id",
            settlement_id,
        )
        owners = {r["account_id"]: (r["name"], r["shard_id"]) for r in rows}
        by_currency: dict[str, dict[int, int]] = defaultdict(dict)
        for r in rows:
            by_currency[r["currency"].strip()][r["account_id"]] = from_decimal(r["net"])
        moves = []
        for currency, nets in sorted(by_currency.items()):
            hub_account = await self._hub_settlement_account(currency)
            moves.extend(settlement_moves(settlement_id, nets, hub_account))
        return moves, owners

    async def _reserve_recipients(self, settlement_id: int, model: Model) -> None:
        """PS_TRANSFERS_RESERVED: net recipients' accounts are debited (reserved) toward zero."""
        moves, owners = await self._moves(settlement_id)
        for move in (m for m in moves if m.recipient):
            name, shard = owners[move.account_id]
            result = (await self.ledger.execute(shard, [pb.Command(reserve=pb.Reserve(
                transfer_id=move.transfer_id, debit_account_id=move.debit_account_id,
                credit_account_id=move.credit_account_id, amount_minor=str(move.amount_minor), check=pb.CHECK_NONE,
            ))])).results[0]
            if result.outcome not in _OK:
                raise SettlementError(3100, f"settlement transfer {move.transfer_id} refused: {result.outcome}")
            if result.outcome == Outcome.OK and model.require_liquidity_check:
                await self._raise_cap_if_needed(name, shard, move.account_id, move.amount_minor)

    async def _raise_cap_if_needed(self, name: str, shard: int, account_id: int, amount_minor: int) -> None:
        described = await self.ledger.describe(shard, name)
        for account in (described["participants"][0]["accounts"] if described["participants"] else []):
            if account["account_id"] != account_id or not account["net_debit_cap"]:
                continue
            # The reservation is already in the value: the position before it was value - amount.
            value_minor = from_decimal(Decimal(account["value"]))
            cap = raised_net_debit_cap(from_decimal(Decimal(account["net_debit_cap"])), value_minor - amount_minor,
                                       amount_minor)
            if cap is not None:
                log.info("settlement raises %s's net debit cap on account %s to %s", name, account_id, cap)
                await self.ledger.execute(shard, [pb.Command(set_net_debit_cap=pb.SetNetDebitCap(
                    account_id=account_id, cap_minor=str(cap)))])

    async def _commit_all(self, settlement_id: int) -> None:
        """PS_TRANSFERS_COMMITTED: recipients' reservations commit (the hub account is credited); net
        senders' accounts are credited from the hub account in one step."""
        moves, owners = await self._moves(settlement_id)
        hub_shard = (await self._participant(self.hub_name))[1]
        by_shard: dict[int, list[tuple[pb.Command, str]]] = defaultdict(list)
        for move in moves:
            if move.recipient:
                by_shard[owners[move.account_id][1]].append(
                    (pb.Command(commit=pb.Commit(transfer_id=move.transfer_id)), move.transfer_id))
            else:
                by_shard[hub_shard].append((pb.Command(reserve=pb.Reserve(
                    transfer_id=move.transfer_id, debit_account_id=move.debit_account_id,
                    credit_account_id=move.credit_account_id, amount_minor=str(move.amount_minor),
                    check=pb.CHECK_NONE, commit_now=True)), move.transfer_id))
        for shard, items in by_shard.items():
            reply = await self.ledger.execute(shard, [c for c, _ in items])
            for (_, transfer_id), result in zip(items, reply.results, strict=True):
                if result.outcome not in (*_OK, Outcome.ALREADY_COMMITTED.value):
                    raise SettlementError(3100, f"settlement transfer {transfer_id} refused: {result.outcome}")

    async def _release_reservations(self, settlement_id: int, reason: str) -> None:
        moves, owners = await self._moves(settlement_id)
        by_shard: dict[int, list[pb.Command]] = defaultdict(list)
        for move in (m for m in moves if m.recipient):
            by_shard[owners[move.account_id][1]].append(
                pb.Command(abort=pb.Abort(transfer_id=move.transfer_id, reason=f"settlement aborted: {reason}"[:200])))
        for shard, commands in by_shard.items():
            reply = await self.ledger.execute(shard, commands)
            for command, result in zip(commands, reply.results, strict=True):
                # Never reserved (aborted before PS_TRANSFERS_RESERVED) or already released: nothing to undo.
                if result.outcome not in (Outcome.OK, Outcome.ALREADY_ABORTED, Outcome.UNKNOWN_TRANSFER):
                    raise SettlementError(3100, f"releasing {command.abort.transfer_id} failed: {result.outcome}")

    async def _settlement_row(self, connection, settlement_id: int) -> asyncpg.Record:
        row = await connection.fetchrow(
            "SELECT settlement_id, settlement_model_id, state, reason, created_at, changed_at FROM settlement"
            " WHERE settlement_id = $1", settlement_id,
        )
        if row is None:
            raise SettlementError(3100, f"settlement {settlement_id} does not exist")
        return row

    async def _model_of(self, settlement: asyncpg.Record) -> Model:
        async with self.pool.acquire() as connection:
            return next(m for m in await load_models(connection)
                        if m.model_id == settlement["settlement_model_id"])

    # ------------------------------------------------------------------ interchange fee rules

    async def set_fee_rule(self, currency: str, basis_points: int, paid_by: FeePayer) -> None:
        await self.pool.execute(
            "INSERT INTO interchange_fee_rule (currency, basis_points, paid_by) VALUES ($1, $2, $3)"
            " ON CONFLICT (currency) DO UPDATE SET basis_points = EXCLUDED.basis_points, paid_by = EXCLUDED.paid_by,"
            " changed_at = now()", currency, basis_points, str(paid_by),
        )


async def _refresh_windows(connection, window_ids) -> None:
    """Each window takes the lowest state of its content (RULES.md section 15)."""
    for window_id in sorted(set(window_ids)):
        states = [WindowState(r["state"]) for r in await connection.fetch(
            "SELECT state FROM settlement_window_content WHERE settlement_window_id = $1", window_id)]
        await connection.execute(
            "UPDATE settlement_window SET state = $2, changed_at = now()"
            " WHERE settlement_window_id = $1 AND state NOT IN ('OPEN', 'PROCESSING') AND state <> $2",
            window_id, str(window_state_of(states)),
        )


def _columns(ranges: list[tuple[int, int, int]]) -> tuple[list, list, list]:
    return [r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges]
