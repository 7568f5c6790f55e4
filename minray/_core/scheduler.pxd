# Typed interface of the node manager's scheduling queues.

cdef class Task:
    cdef public bytes task_id
    cdef public object spec            # what is sent to the worker
    cdef public dict resources         # {"CPU": 1.0, "GPU": 1.0, "custom": 2.0}
    cdef public tuple shape            # hashable form of resources: a queue key
    cdef public int missing            # dependencies not available yet
    cdef public int retries_left
    cdef public object owner           # connection that submitted it
    cdef public object worker          # worker running it, or None
    cdef public object extra           # node-manager bookkeeping


cdef class SchedulerQueues:
    cdef dict total
    cdef dict available
    cdef readonly dict waiting         # object id -> list of Task
    cdef dict ready                    # shape -> deque of Task
    cdef list shapes                   # round-robin order of shapes
    cdef dict gpu_shapes               # shape -> it asks for a GPU (a worker kind)
    cdef Py_ssize_t next_shape
    cdef public Py_ssize_t num_ready
    cdef public Py_ssize_t num_waiting

    cpdef bint feasible(self, dict resources)
    cpdef bint fits(self, dict resources)
    cpdef acquire(self, dict resources)
    cpdef release(self, dict resources)
    cpdef add(self, Task task, list missing)
    cpdef list object_available(self, bytes object_id)
    cpdef push_ready(self, Task task, bint front=*)
    cpdef Task pop_dispatchable(self, bint gpu_ok=*, bint cpu_ok=*)
    cpdef Task pop_shape(self, tuple shape)
    cpdef list drain_waiting_on(self, bytes object_id)
