"""Actors across nodes: the part of the actor manager that talks to other
node managers (a mixin of minray.node_manager.actors.ActorManager).

An actor that does not fit this node (its resources are not here, or not
free while another node has room) is created on another node chosen by the
cluster view; this node remembers where (`remote`) and sends it the actor's
calls and kill. The hosting node sees this node as the actor's owner and as
the caller of every call sent from here (one FIFO for all of them, so each
caller's order holds). A node that holds a handle of an actor created
elsewhere asks the node that owns the handle where the actor lives
("locate_actor", answered with "actor_host") and from then on sends its
calls straight there; calls made while it asks wait, so none overtakes
another. While the owner has not placed the actor yet, it answers with
itself and passes the calls on.

Names are unique in the whole cluster: the head keeps the names of actors
created on other nodes, (namespace, name) -> (record, address of the
creating node); other nodes claim, look up and release names there ("name"
requests, answered with "name_reply").
"""
import asyncio
import logging

from minray import ids
from minray._core.scheduler import Task
from minray.exceptions import ActorDiedError
from minray.node_manager.objects import error_object

PENDING, ALIVE, RESTARTING, DEAD = "PENDING", "ALIVE", "RESTARTING", "DEAD"
log = logging.getLogger("minray.node_manager")
# How long calls wait for an owner's answer to "locate_actor" (a link that
# broke may have lost it: they then go through the owner), and how long a
# host keeps calls that came before the "create" of their actor.
LOCATE_TIMEOUT_S = 10.0
CREATION_WAIT_S = 30.0


class ActorsAcrossNodes:
    """Methods of ActorManager for actors placed, called and named across
    nodes; they use its attributes (actors, names, remote, remote_names,
    cluster, peers, objects, dispatcher, tasks)."""

    def _place_elsewhere(self, actor, needed):
        """Create the actor on another node if it does not fit here; True if so."""
        cluster = self.cluster
        if cluster is None or len(cluster.nodes) < 2:
            return False
        queues = self.dispatcher.queues
        if queues.feasible(needed) and (self._fits_after_unplaced(needed)
                                        or not cluster.room_elsewhere(needed)):
            return False
        node = cluster.pick_node_for_actor(needed, (self.objects.address,),
                                           need_room=queues.feasible(needed))
        if node is None:
            return False
        peer = self.peers.get(node.address)
        spec = actor.spec
        if spec["class_id"] not in peer.functions:
            peer.functions.add(spec["class_id"])
            peer.send(("fn", spec["class_id"], self.dispatcher.functions.get(spec["class_id"]),
                       spec["class_name"]))
        held = [a[1] for a in spec["args"] if a[0] == "r"] + list(spec["contained"])
        arg_owners = {object_id: self.objects.owner_address(object_id) for object_id in held}
        peer.send(("create", spec, arg_owners))
        self.remote[actor.actor_id] = peer
        actor.state = ALIVE
        # Our handles entry stands for the hosting node's: freeing it frees that.
        self.objects.get(ids.actor_handle_id(actor.actor_id)).primary_peer = peer
        return True

    def _fits_after_unplaced(self, needed):
        """Whether this node has room for `needed` once the actors already
        waiting here to be placed have theirs."""
        total = dict(needed)
        for actor in self.unplaced:
            for name, amount in actor.needs.items():
                total[name] = total.get(name, 0.0) + amount
        return self.dispatcher.queues.fits(total)

    def on_create_forwarded(self, owner, spec, arg_owners):
        """Another node asks us to host an actor created there."""
        self.objects.adopt_foreign(arg_owners, self.peers)
        self.on_create(owner, spec, 0)
        early = self.awaiting_creation.pop(spec["actor_id"], None)
        if early is not None:
            self._send_parked(early)

    def _before_its_creation(self, conn, spec):
        """A call another node sent us for an actor we don't know: its owner
        said we host it, and its "create" (on another link) is still on the
        way. Keep it (in order) until that comes; True if kept."""
        if conn.role != "node":
            return False
        early = self.awaiting_creation.get(spec.actor_id)
        if early is None:
            early = self.awaiting_creation[spec.actor_id] = []
            asyncio.get_running_loop().call_later(
                CREATION_WAIT_S, self._creation_overdue, spec.actor_id)
        early.append((conn, spec))
        return True

    def _creation_overdue(self, actor_id):
        early = self.awaiting_creation.pop(actor_id, None)
        if early is None:
            return
        for conn, spec in early:
            task = Task(spec.task_id, spec, {}, 0, conn)
            self.tasks.fail_with(task, ActorDiedError(
                f"no actor {actor_id.hex()} on this node: its creation never came"))

    def on_call_forwarded(self, caller, fields, arg_owners):
        """A call of an actor we host, or know the host of, from another node."""
        self.objects.adopt_foreign(arg_owners, self.peers)
        self.on_call(caller, fields)

    def _forward_call(self, peer, spec):
        held = [a[1] for a in spec.args if a[0] == "r"] + list(spec.contained)
        arg_owners = {object_id: self.objects.owner_address(object_id) for object_id in held}
        peer.send(("call", tuple(spec), arg_owners))

    def _must_locate(self, conn, spec):
        """Park a call of an actor created elsewhere whose host we do not know
        yet, and ask its owner where it lives; True if parked."""
        actor_id = spec.actor_id
        locating = self.locating.get(actor_id)
        if locating is None:
            handles = self.objects.get(ids.actor_handle_id(actor_id))
            owner = handles.owner_peer if handles is not None else None
            if owner is None or owner.closed:
                return False
            locating = self.locating[actor_id] = (owner, [])
            owner.send(("locate_actor", actor_id))
            asyncio.get_running_loop().call_later(LOCATE_TIMEOUT_S, self._locate_overdue,
                                                  actor_id, locating)
        locating[1].append((conn, spec))
        return True

    def on_locate_actor(self, peer, actor_id):
        """Where an actor we own lives: its host, or here (we pass calls on)."""
        host = self.remote.get(actor_id)
        peer.send(("actor_host", actor_id, host.address if host is not None
                   else self.objects.address))

    def on_actor_host(self, peer, actor_id, address):
        """The owner's answer: send the parked calls, and later ones, there."""
        locating = self.locating.get(actor_id)
        if locating is None or locating[0] is not peer:
            return                      # not asked, or not of the node we asked
        del self.locating[actor_id]
        nodes = self.cluster.nodes if self.cluster is not None else {}
        if (isinstance(address, str) and address not in (peer.address, self.objects.address)
                and address in nodes and nodes[address].alive):
            host = self.peers.get(address)
        else:
            host = peer                 # through the owner, which passes calls on
        self.remote.setdefault(actor_id, host)
        self._send_parked(locating[1])

    def _locate_overdue(self, actor_id, locating):
        if self.locating.get(actor_id) is locating:
            del self.locating[actor_id]
            self.remote.setdefault(actor_id, locating[0])
            self._send_parked(locating[1])

    def _send_parked(self, parked):
        for conn, spec in parked:
            if not conn.closed:
                self.on_call(conn, tuple(spec))     # (its results are expected already)

    def _host_of(self, actor_id):
        """The peer to send a call of an actor not hosted here, or None."""
        peer = self.remote.get(actor_id)
        if peer is not None:
            return peer
        handles = self.objects.get(ids.actor_handle_id(actor_id))
        if handles is not None and handles.owner_peer is not None:
            return handles.owner_peer          # the node that created it passes it on
        return None

    def _forget_remote(self, actor, why=None):
        """An actor we created on another node is gone (killed, or its node died)."""
        actor.state = DEAD
        actor.death = error_object(ActorDiedError(why or (
            f"actor {actor.spec['class_name']} was killed with minray.kill")))
        self._let_go(actor)
        self.tasks.release_args(actor.spec["args"], actor.spec["contained"])

    def node_died(self, address):
        """Actors we placed on a dead node start again on a live node that
        fits them while they have restarts left (max_restarts), and are dead
        otherwise; calls that were running there have failed already."""
        for actor_id, (owner, parked) in list(self.locating.items()):
            if owner.address == address:
                # Their calls now fail: the node that knew the actor is gone.
                del self.locating[actor_id]
                self._send_parked(parked)
        for actor_id, peer in list(self.remote.items()):
            if peer.address == address:
                del self.remote[actor_id]
                actor = self.actors.get(actor_id)
                if actor is None or actor.state == DEAD:
                    continue
                if actor.restarts_left != 0 and not actor.released:
                    self._restart_elsewhere(actor, address)
                else:
                    self._forget_remote(actor, f"actor {actor.spec['class_name']} died: its "
                                               f"node {address} died (max_restarts exhausted)")
        for actor_id, kept in self.calls_to_resend.items():     # (not restarted after all)
            for task in kept:
                self.tasks.fail_with(task, ActorDiedError(
                    f"the node {address} hosting the actor of call {task.spec.method} died"))
        self.calls_to_resend.clear()

    def _keep_call_for_restart(self, task, address):
        """A call that was on a node that died: kept to send to the actor's
        next instance if the actor will restart and the call has retries
        left (max_task_retries); False if it is to fail."""
        actor = self.actors.get(task.spec.actor_id)
        if (actor is None or actor.state == DEAD or actor.restarts_left == 0
                or actor.released or task.retries_left == 0):
            return False
        if task.retries_left > 0:
            task.retries_left -= 1
        self.calls_to_resend.setdefault(actor.actor_id, []).append(task)
        return True

    def _restart_elsewhere(self, actor, dead_address):
        """Run an actor whose node died again (its constructor too), here or
        on another live node that fits it; it keeps its id, name and handles."""
        name = actor.spec["class_name"]
        if actor.restarts_left > 0:
            actor.restarts_left -= 1
        # The new host restarts it after a crash of its own only as often as
        # is left in all.
        actor.spec = dict(actor.spec, max_restarts=actor.restarts_left)
        actor.state = RESTARTING
        log.warning("actor %s lost its node %s; restarting it", name, dead_address)
        self.lineage.actor(actor.actor_id, self._record(actor))
        handles = self.objects.get(ids.actor_handle_id(actor.actor_id))
        if handles is not None:
            handles.primary_peer = None
        needed = actor.needs
        again = self.calls_to_resend.pop(actor.actor_id, [])
        if self._place_elsewhere(actor, needed):
            host = self.remote[actor.actor_id]
            for task in again:               # in the order they were first sent
                self.tasks.spilled[task.task_id] = (task, host, False)
                self._forward_call(host, task.spec)
            return
        if self.dispatcher.queues.feasible(needed):
            self._queue_first(actor, again)
            self.unplaced.append(actor)
            self.dispatcher.schedule()
            return
        self.calls_to_resend[actor.actor_id] = again      # (failed by node_died)
        self._forget_remote(actor, f"actor {name} died: its node {dead_address} died and no "
                                   f"live node has the resources it needs ({needed})")

    def claim_names_again(self):
        """A restarted head knows no names: claim ours again."""
        for key in list(self.names):
            found = self.lookup(*key)
            if found is not None:
                self._ask_head(None, "claim", key, found)

    def _asks_head(self):
        return self.cluster is not None and not self.cluster.is_head

    def _ask_head(self, pending, what, key, record=None):
        self.next_name_request += 1
        self.name_requests[self.next_name_request] = pending
        self.peers.get(self.cluster.head_address).send(
            ("name", self.next_name_request, what, list(key), record))

    def on_name_request(self, peer, number, what, key, record):
        """On the head: a node claims, looks up or releases a name."""
        key = tuple(key)
        if what == "release":
            found = self.remote_names.get(key)
            if found is not None and found[0][0] == record:
                del self.remote_names[key]
            return
        existing = self._find_name(key)
        if what == "claim" and existing is None:
            self.remote_names[key] = (tuple(record), peer.address)
        peer.send(("name_reply", number, existing))

    def _find_name(self, key):
        """(record, address of the node that created it) of a named actor, or None."""
        found = self.lookup(*key)
        if found is not None:
            return found, self.objects.address
        remote = self.remote_names.get(key)
        return (remote[0], remote[1]) if remote is not None else None

    def on_name_reply(self, peer, number, existing):
        pending = self.name_requests.pop(number, None)
        if pending is None:
            return
        if existing is not None:
            record, address = existing
            if address != self.objects.address:
                self.remote.setdefault(record[0], self.peers.get(address))
            existing = tuple(record)
        if pending[0] == "lookup":
            _, conn, request_id = pending
            conn.send(("info", request_id, existing))
            return
        _, conn, spec, request_id = pending
        if existing is None:
            self._create(conn, spec, request_id)
        elif spec.get("get_if_exists"):
            conn.send(("info", request_id, existing))
        else:
            conn.send(("info", request_id, self._name_taken(spec["name"], spec["namespace"])))

    def lookup_anywhere(self, conn, request_id, namespace, name):
        """get_actor: this node's names, else the head's (answered later)."""
        found = self.lookup(namespace, name)
        if found is None and self.cluster is not None:
            if self._asks_head():
                self._ask_head(("lookup", conn, request_id), "lookup", (namespace, name))
                return
            remote = self.remote_names.get((namespace, name))
            if remote is not None:
                record, address = remote
                self.remote.setdefault(record[0], self.peers.get(address))
                found = record
        conn.send(("info", request_id, found))

    def _release_name(self, actor):
        key = actor.registered_name
        if key is not None and self._asks_head():
            self._ask_head(None, "release", key, actor.actor_id)

    @staticmethod
    def _name_taken(name, namespace):
        return (f"The name {name!r} is already taken by another actor in namespace "
                f"{namespace!r}: pick another name, or reach that actor with "
                f"minray.get_actor({name!r}, namespace={namespace!r})")
