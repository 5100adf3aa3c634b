"""The built-in passes' modules, one rewrite each (``run``, its fact checks, and the
:class:`~bitcompiler.passes.Pass` object named like the module). ``bitcompiler.passes``
re-exports the Pass objects; the modules live here so that a Pass never shadows its module."""
