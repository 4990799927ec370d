"""Conversations: their history, their one running turn, and how long they are kept.

Owns each conversation's upstream task (at most one at a time, named
`upstream:<id>:<turn>`), the messages sent upstream for each turn, retention of finished
conversations, the `max_conversations` bound and the bound on turns streaming at once
(`limits.max_live_conversations`). Publishing goes through the hub's log;
nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from .chat_request import ChatStart
from .config import HubSettings
from .errors import Conflict, NotFound, TooManyRequests
from .hub import EventLog, Hub
from .observers import Observers
from .tasks import cancel_and_wait
from .transcript import STREAMING
from .turn_runner import end_unstarted_turn, run_turn, start_turn_event
from .upstream import UpstreamClient

logger = logging.getLogger(__name__)

# What a create or follow-up refused by the live-turn bound is told to wait: answers take
# seconds, so a slot is likely free by then.
LIVE_TURN_RETRY_AFTER_SECONDS = 5


def new_conversation_id() -> str:
    """A random, unguessable id: 144 bits from the OS CSPRNG, URL-safe. The leading "c"
    keeps an id from starting with "-", which command-line tools would take for a flag."""
    return "c" + secrets.token_urlsafe(18)


class Conversation:
    """One conversation: its request, follow-ups, log and current turn task."""

    def __init__(self, conversation_id: str, start: ChatStart, log: EventLog) -> None:
        self.id = conversation_id
        self.model = start.model
        self.created_at = time.time()
        self.finished_at: float | None = None
        self._start = start
        self._follow_ups: list[str] = []
        self.log = log
        self._task: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        # Set when deletion or shutdown begins, so no new turn starts while it waits.
        self.closing = False
        # hub.on_no_subscribers = "cancel": cancel a streaming turn nobody has watched for
        # this long (None: keep generating, so a reload or late joiner gets the answer).
        self._unwatched_grace: float | None = None
        self._unwatched: asyncio.TimerHandle | None = None

    @property
    def turn_count(self) -> int:
        return len(self._follow_ups) + 1

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The current (or last) turn's upstream task."""
        return self._task

    @property
    def streaming(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def status(self) -> str:
        return STREAMING if self.streaming else self.log.transcript.status

    def user_messages(self) -> list[dict[str, Any]]:
        """The messages the client sent: the initial request's, then each follow-up."""
        return [*self._start.messages, *({"role": "user", "content": c} for c in self._follow_ups)]

    def message_count_after_follow_up(self) -> int:
        """How many messages the next turn's upstream request would carry: the original
        ones, then an answer and a user message per turn so far."""
        return len(self._start.messages) + 2 * self.turn_count

    def upstream_request(self, turn: int) -> dict[str, Any]:
        """The whole conversation so far, as the chat request for `turn`."""
        messages = list(self._start.messages)
        turns = self.log.transcript.turns
        for previous in range(turn):
            choices = turns[previous].choices if previous < len(turns) else {}
            answer = choices[0].content if 0 in choices else ""
            messages.append({"role": "assistant", "content": answer})
            messages.append({"role": "user", "content": self._follow_ups[previous]})
        return {**self._start.params, "model": self.model, "messages": messages}

    def start_turn(
        self,
        client: UpstreamClient,
        *,
        follow_up: str | None = None,
        observers: Observers | None = None,
    ) -> int:
        """Start the next turn's upstream task. Raises Conflict while one is streaming."""
        if self.streaming:
            raise Conflict("a turn is still streaming; wait for done or cancel it",
                           code="turn_in_progress")
        if self.closing or self.log.closed:
            raise NotFound("conversation not found", code="conversation_not_found")
        if follow_up is not None:
            self._follow_ups.append(follow_up)
        turn = self.turn_count - 1
        self.cancel_expiry()
        self.finished_at = None
        label = f"conversation {self.id}"
        request = self.upstream_request(turn)
        start_turn_event(self.log, turn, request["model"])
        self._task = asyncio.create_task(
            run_turn(
                client=client,
                log=self.log,
                turn=turn,
                request=request,
                label=label,
                conversation_id=self.id,
                observers=observers,
            ),
            name=f"upstream:{self.id}:{turn}",
        )
        self._task.add_done_callback(lambda task: self._turn_task_done(task, turn))
        if self.log.subscriber_count == 0:
            self._start_unwatched_timer()
        return turn

    def _turn_task_done(self, task: asyncio.Task[None], turn: int) -> None:
        self._stop_unwatched_timer()
        turns = self.log.transcript.turns
        if task.cancelled() and not self.log.closed and turns[turn].status == STREAMING:
            # Cancelled before its first step: the runner never ran to say so.
            end_unstarted_turn(self.log, turn, "the turn was cancelled before it started")

    def cancel_when_unwatched(self, grace_seconds: float) -> None:
        """Policy "cancel": a streaming turn with no subscriber for `grace_seconds` is
        cancelled (error `cancelled`). Watches the log's subscriber count from now on."""
        self._unwatched_grace = grace_seconds
        self.log.on_subscribers_changed(self._subscribers_changed)

    def _subscribers_changed(self, count: int) -> None:
        if count > 0:
            self._stop_unwatched_timer()
        elif self.streaming:
            self._start_unwatched_timer()

    def _start_unwatched_timer(self) -> None:
        if self._unwatched_grace is None or self._unwatched is not None:
            return
        self._unwatched = asyncio.get_running_loop().call_later(
            self._unwatched_grace, self._cancel_unwatched
        )

    def _stop_unwatched_timer(self) -> None:
        if self._unwatched is not None:
            self._unwatched.cancel()
            self._unwatched = None

    def _cancel_unwatched(self) -> None:
        self._unwatched = None
        task = self._task
        if task is not None and not task.done() and self.log.subscriber_count == 0:
            logger.info(
                "conversation %s: nobody watched for %g s; cancelling the turn "
                "(hub.on_no_subscribers = cancel)", self.id, self._unwatched_grace,
                extra={"conversation": self.id},
            )
            # The conversation's done callbacks observe the end; nothing here awaits it.
            task.cancel(f"nobody was watching for {self._unwatched_grace:g} s")

    def add_done_callback(self, callback: Any) -> None:
        assert self._task is not None
        self._task.add_done_callback(callback)

    async def stop_turn(self, reason: str) -> bool:
        """Cancel the running turn (it ends with `error` code `cancelled`) and wait for it.

        Returns False when no turn was streaming.
        """
        task = self._task
        if task is None or task.done():
            return False
        await cancel_and_wait(task, reason)
        return True

    def schedule_expiry(self, delay: float, callback: Any) -> None:
        self.cancel_expiry()
        self._expiry = asyncio.get_running_loop().call_later(delay, callback, self.id)

    def cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def to_json(self) -> dict[str, Any]:
        snapshot = self.log.snapshot()
        return {
            "id": self.id,
            "status": self.status,
            "model": self.model,
            "created_at": self.created_at,
            "turns": snapshot["turns"],
            "subscribers": self.log.subscriber_count,
            "last_seq": snapshot["seq"],
            "messages": self.user_messages(),
        }


class ConversationRegistry:
    """All conversations held by this process, bounded by `max_conversations`."""

    def __init__(
        self, *, hub: Hub, client: UpstreamClient, settings: HubSettings, max_live_turns: int = 0
    ) -> None:
        self._hub = hub
        self._client = client
        self._settings = settings
        self._conversations: dict[str, Conversation] = {}
        # Turns streaming now, counted as their tasks start and end; 0 = no bound.
        self._max_live_turns = max_live_turns
        self._live_turns = 0
        # Metrics, the firehose: told of every lifecycle step (see observers.py).
        self.observers = Observers()

    def __len__(self) -> int:
        return len(self._conversations)

    @property
    def live_turns(self) -> int:
        """Turns whose upstream task is running, across all conversations."""
        return self._live_turns

    @property
    def client(self) -> UpstreamClient:
        """The upstream client every turn streams through."""
        return self._client

    def all(self) -> list[Conversation]:
        return list(self._conversations.values())

    def get(self, conversation_id: str) -> Conversation:
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            raise NotFound("conversation not found", code="conversation_not_found")
        return conversation

    def create(self, start: ChatStart) -> Conversation:
        """Register a conversation and start its first turn (one upstream request)."""
        self._admit_live_turn()
        if len(self._conversations) >= self._settings.max_conversations:
            self._evict_oldest_finished()
        conversation_id = new_conversation_id()
        conversation = Conversation(conversation_id, start, self._hub.open(conversation_id))
        if self._settings.on_no_subscribers == "cancel":
            conversation.cancel_when_unwatched(self._settings.idle_grace_seconds)
        self._conversations[conversation_id] = conversation
        self.observers.conversation_created(conversation_id, start.model)
        self._start_turn(conversation, follow_up=None)
        logger.info(
            "conversation %s created (model %s, %d messages)",
            conversation_id, start.model, len(start.messages),
            extra={"conversation": conversation_id},
        )
        return conversation

    def follow_up(self, conversation_id: str, content: str) -> tuple[Conversation, int]:
        conversation = self.get(conversation_id)
        if not conversation.streaming:  # else start_turn answers 409 turn_in_progress
            self._admit_live_turn()
        turn = self._start_turn(conversation, follow_up=content)
        return conversation, turn

    async def cancel(self, conversation_id: str) -> Conversation:
        conversation = self.get(conversation_id)
        if not await conversation.stop_turn("cancelled by request"):
            raise Conflict("no turn is streaming", code="not_streaming")
        logger.info(
            "conversation %s: turn cancelled by request", conversation_id,
            extra={"conversation": conversation_id},
        )
        return conversation

    async def delete(self, conversation_id: str) -> None:
        conversation = self.get(conversation_id)
        await self._remove(conversation, "deleted")
        logger.info(
            "conversation %s deleted", conversation_id, extra={"conversation": conversation_id}
        )

    async def shut_down(self, *, grace_seconds: float, retry_hint_ms: int) -> None:
        """Graceful shutdown: end every subscriber's stream now (`end` "shutdown" with a
        `retry:` hint, so clients come back once a server is up), give running turns up to
        `grace_seconds` to finish, cancel the rest (`error` "cancelled"), free everything."""
        for conversation in self._conversations.values():
            conversation.closing = True
            conversation.log.end_subscribers("shutdown", retry_ms=retry_hint_ms)
        running = [c.task for c in self._conversations.values() if c.task is not None]
        running = [task for task in running if not task.done()]
        if running:
            logger.info(
                "shutdown: waiting up to %g s for %d streaming turns", grace_seconds, len(running)
            )
            await asyncio.wait(running, timeout=grace_seconds)
        await self.close_all("shutdown")

    async def close_all(self, reason: str) -> None:
        """Stop every turn and end every stream with `end` `reason` (server shutdown)."""
        for conversation in list(self._conversations.values()):
            await self._remove(conversation, reason)

    def _start_turn(self, conversation: Conversation, *, follow_up: str | None) -> int:
        turn = conversation.start_turn(
            self._client, follow_up=follow_up, observers=self.observers
        )
        self._live_turns += 1
        conversation.add_done_callback(self._live_turn_ended)
        conversation.add_done_callback(lambda _task: self._turn_finished(conversation))
        return turn

    def _admit_live_turn(self) -> None:
        if self._max_live_turns and self._live_turns >= self._max_live_turns:
            raise TooManyRequests(
                f"{self._live_turns} answers are streaming, the most this server runs at "
                "once; try again in a few seconds",
                code="too_many_live_conversations",
                retry_after=LIVE_TURN_RETRY_AFTER_SECONDS,
            )

    def _live_turn_ended(self, _task: object) -> None:
        self._live_turns -= 1

    def _turn_finished(self, conversation: Conversation) -> None:
        if self._conversations.get(conversation.id) is not conversation:
            return
        if conversation.streaming:
            # A follow-up started the next turn before this callback ran (it runs a loop
            # step after the task ends): the conversation is not finished.
            return
        conversation.finished_at = time.monotonic()
        conversation.schedule_expiry(self._settings.retention_seconds, self._expire)

    def _expire(self, conversation_id: str) -> None:
        conversation = self._conversations.get(conversation_id)
        if conversation is None or conversation.streaming:
            return
        self._forget(conversation, "expired")
        logger.info(
            "conversation %s expired", conversation_id, extra={"conversation": conversation_id}
        )

    def _evict_oldest_finished(self) -> None:
        finished = [c for c in self._conversations.values() if c.finished_at is not None]
        if not finished:
            raise TooManyRequests(
                f"all {len(self._conversations)} conversations are still streaming; "
                "try again when one finishes",
                code="too_many_conversations",
                retry_after=5,
            )
        oldest = min(finished, key=lambda c: c.finished_at or 0.0)
        self._forget(oldest, "evicted")
        logger.info(
            "conversation %s evicted to make room (max_conversations)", oldest.id,
            extra={"conversation": oldest.id},
        )

    async def _remove(self, conversation: Conversation, reason: str) -> None:
        conversation.closing = True
        try:
            stopped = await conversation.stop_turn(f"conversation {reason}")
        except asyncio.CancelledError:
            # Our caller went away (a DELETE whose client disconnected): finish the removal
            # once the turn task has ended, rather than leave it half done. Not before: the
            # task still publishes its `error` to the log that _forget closes.
            task = conversation.task
            if task is not None and not task.done():
                task.add_done_callback(lambda _task: self._forget(conversation, reason))
            else:
                self._forget(conversation, reason)
            raise
        if stopped and reason == "shutdown":
            logger.info(
                "shutdown: cancelled the turn of conversation %s", conversation.id,
                extra={"conversation": conversation.id},
            )
        self._forget(conversation, reason)

    def _forget(self, conversation: Conversation, reason: str) -> None:
        conversation.cancel_expiry()
        if self._conversations.pop(conversation.id, None) is None:
            return
        conversation.log.close(reason)
        self._hub.discard(conversation.id)
        self.observers.conversation_ended(conversation.id, reason)
