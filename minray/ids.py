"""Fixed-length binary ids, derived deterministically for lineage.

    JobID     4 bytes   counter kept by the control store
    TaskID   16 bytes   job id + 12 bytes of hash(parent task id, call index)
    ObjectID 20 bytes   task id + 4-byte index: 1..n for returns,
                        PUT_FLAG | n for the n-th put of that task,
                        0 for an actor's handles (its task id is the actor id)

A task id depends only on its parent and how many tasks the parent submitted
before it, so re-running a parent re-creates the same ids: what lineage
reconstruction needs. Actor ids are task ids (of the creation task).
"""
import hashlib
import os
import struct

JOB_ID_SIZE = 4
TASK_ID_SIZE = 16
OBJECT_ID_SIZE = 20
PUT_FLAG = 0x80000000
_INDEX = struct.Struct(">I")


def job_id_from_int(n):
    return _INDEX.pack(n)


def driver_task_id(job_id):
    """The root task of a driver: the job id, then zeros plus randomness.

    Randomness keeps two drivers of the same job id (e.g. a restarted head
    with a reused counter) from ever minting the same ids.
    """
    return job_id + os.urandom(TASK_ID_SIZE - JOB_ID_SIZE)


def child_task_id(parent_task_id, index):
    digest = hashlib.blake2b(parent_task_id + _INDEX.pack(index),
                             digest_size=TASK_ID_SIZE - JOB_ID_SIZE).digest()
    return parent_task_id[:JOB_ID_SIZE] + digest


def return_object_id(task_id, index):
    """Id of a task's index-th return value (index from 1)."""
    return task_id + _INDEX.pack(index)


def actor_handle_id(actor_id):
    """The object id that stands for an actor's handles in the object
    directory: the actor lives while this object is held (index 0 is no
    task's return value)."""
    return actor_id + _INDEX.pack(0)


def put_object_id(task_id, index):
    return task_id + _INDEX.pack(PUT_FLAG | index)


def is_put(object_id):
    return bool(_INDEX.unpack_from(object_id, TASK_ID_SIZE)[0] & PUT_FLAG)


def task_of(object_id):
    return object_id[:TASK_ID_SIZE]
