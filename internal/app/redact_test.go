package app

import "testing"

func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"nats://svc:S3cret@host:4222":                             "nats://svc:xxxxx@host:4222",
		"nats://a:p1@h1:4222,nats://b:p2@h2:4222":                 "nats://a:xxxxx@h1:4222,nats://b:xxxxx@h2:4222",
		"nats://tok3n@host:4222":                                  "nats://xxxxx@host:4222",
		"nats://host:4222":                                        "nats://host:4222",
		"postgres://u:S3cret@db:5432/x?sslmode=disable":           "postgres://u:xxxxx@db:5432/x?sslmode=disable",
		"postgres://u@db1:5432,db2:5432/x?password=S3cret":        "postgres://u@db1:5432,db2:5432/x?password=xxxxx",
		"postgres://postgres@127.0.0.1:5432/tokenpipe":            "postgres://postgres@127.0.0.1:5432/tokenpipe",
		"host=db user=u password=S3cret dbname=x":                 "host=db user=u password=xxxxx dbname=x",
		"host=db user=u password='S3 c\\'ret' dbname=x":           "host=db user=u password=xxxxx dbname=x",
		"host=db user=u PASSWORD = S3cret sslpassword=k dbname=x": "host=db user=u PASSWORD = xxxxx sslpassword=xxxxx dbname=x",
		"https://user:pw@proxy.example/":                          "https://user:xxxxx@proxy.example/",
		"nats://svc:ab/c+d=@host:4222":                            "nats://svc:xxxxx@host:4222",
		"nats://ab/cd+ef@host:4222":                               "nats://xxxxx@host:4222",
		"postgres://u:p@ss@db:5432/x":                             "postgres://u:xxxxx@db:5432/x",
		"nats://a:p/1@h1:4222,nats://b:p@2@h2:4222":               "nats://a:xxxxx@h1:4222,nats://b:xxxxx@h2:4222",
		"connect to nats://host:4222: no servers":                 "connect to nats://host:4222: no servers",
	} {
		if got := RedactURL(in); got != want {
			t.Errorf("RedactURL(%q) = %q, want %q", in, got, want)
		}
	}
}
