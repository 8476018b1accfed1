"""The example packs, installed as ``flyte_gevent.examples``.

The files live in the project's ``examples/`` directory, which setup.cfg maps
onto this package, so ``flyte-gevent demo`` finds them in an installed wheel as
well as in a checkout. Importing a pack module defines its pack and patches
nothing; each one monkey-patches only when it is run as a script.
"""
