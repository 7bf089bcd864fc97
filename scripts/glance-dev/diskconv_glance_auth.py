"""A paste filter for the test Glance: what a Keystone-authenticating proxy would do.

A request whose X-Auth-Token equals the configured token is given the identity
headers Glance's own `context` filter trusts (X-Identity-Status: Confirmed, a
fixed project, user and roles); any other request gets them removed, so the
`context` filter answers 401. Only for the project's test and dev Glance.
"""

_IDENTITY = ('HTTP_X_IDENTITY_STATUS', 'HTTP_X_PROJECT_ID', 'HTTP_X_TENANT_ID', 'HTTP_X_USER_ID', 'HTTP_X_ROLES', 'HTTP_X_ROLE')


class TokenIdentity(object):
    def __init__(self, app, token, project, user, roles):
        self.app = app
        self.token = token
        self.project = project
        self.user = user
        self.roles = roles

    def __call__(self, environ, start_response):
        for key in _IDENTITY:
            environ.pop(key, None)
        if self.token and environ.get('HTTP_X_AUTH_TOKEN') == self.token:
            environ['HTTP_X_IDENTITY_STATUS'] = 'Confirmed'
            environ['HTTP_X_PROJECT_ID'] = self.project
            environ['HTTP_X_USER_ID'] = self.user
            environ['HTTP_X_ROLES'] = self.roles
        return self.app(environ, start_response)


def filter_factory(global_conf, **local_conf):
    with open(local_conf['token_file']) as f:
        token = f.read().strip()
    project = local_conf.get('project_id', 'diskconv-test-project')
    user = local_conf.get('user_id', 'diskconv-test-user')
    roles = local_conf.get('roles', 'admin,member,reader')

    def make(app):
        return TokenIdentity(app, token, project, user, roles)

    return make
