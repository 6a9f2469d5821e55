-- Single sign-on: an account may be linked to one subject (`sub`) of the identity provider
-- the server trusts (`serve --oidc-issuer`). A linked account signs in only through the
-- identity provider, which owns its password and second factor.
ALTER TABLE chartlog_access_users
    ADD COLUMN sso_subject TEXT CHECK (length(sso_subject) BETWEEN 1 AND 255);

CREATE UNIQUE INDEX chartlog_access_users_sso_subject ON chartlog_access_users (sso_subject);
