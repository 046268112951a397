"""How the server's messages reach the ClientApps: the engines.

- :mod:`engines.ray`: Flower's simulation engine (Ray), every node a ClientApp call in a
  Ray worker; fedmask installs a faster message injector into it.
- :mod:`engines.inprocess`: a Grid that calls the ClientApp in this process, one client
  at a time, each message through Flower's serde both ways.
- :mod:`engines.batched`: the in-process Grid, with a round's clients trained together.

Beyond one machine, Flower itself delivers the messages: ``flwr run`` with a SuperLink and
SuperNodes, or Ray on a cluster (``fedmask run --ray-address``).
"""
