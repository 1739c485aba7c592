/* config.c — the one definition of the server's configuration (see server.h); main.c fills it. */
#include "server/server.h"

srv_config g_cfg;
