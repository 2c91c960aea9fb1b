"""
The broker package: everything that talks to RabbitMQ.

* :mod:`listener.broker.connection` - the one connect (with retry for the daemon);
* :mod:`listener.broker.topology` - what is declared, and message properties;
* :mod:`listener.broker.confirms` - the one confirm window;
* :mod:`listener.broker.publisher` - the daemon's journal drain;
* :mod:`listener.broker.inflight` - what it writes for an entry, and keeps until confirmed;
* :mod:`listener.broker.archive` - reading the archive stream back, for replay.
"""
