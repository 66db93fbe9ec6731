"""The application on top of the library: the ``pifa`` command line, benchmarks' building blocks
(timing, speed measurement), report rendering and plots. The core package never imports it."""
